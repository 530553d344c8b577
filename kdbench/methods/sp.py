"""Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation" (RepDistiller `similarity`, mdistiller SP).

Features: the last feature map of each network (RD feat[-2], MD feats[-1]: the deepest stage output), flattened
to N x D. G = f f^T (N x N), each row L2-normalised; loss = sum_ij (G_t - G_s)_ij^2 / N^2. Batch-relational, so
the student and teacher widths/resolutions need not match. Benchmark: CE 1 + 3000 * SP (RD and MD agree).
"""
import torch
import torch.nn.functional as F

from kdbench.distill import Method, register_method


def similarity_matrix(f: torch.Tensor) -> torch.Tensor:
    """Row-L2-normalised Gram matrix of the flattened batch (N x N)."""
    f = f.reshape(f.shape[0], -1)
    return F.normalize(f @ f.t(), p=2, dim=1)


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """sum of squared differences of the normalised similarity matrices, divided by N^2 (teacher detached)."""
    n = f_s.shape[0]
    diff = similarity_matrix(f_t.detach()) - similarity_matrix(f_s)
    return (diff * diff).sum() / (n * n)


@register_method("sp")
class SP(Method):
    paper = "Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019"
    code = "HobbitLong/RepDistiller distiller_zoo/SP.py; megvii-research/mdistiller SP"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        if not pair.student.stage_names or not pair.teacher.stage_names:
            raise pair.incompatible(self.method_name, "it needs stage features (stage_names) on both models")
        self.s_tap, self.t_tap = pair.student.stage_names[-1], pair.teacher.stage_names[-1]
        self.student_taps, self.teacher_taps = (self.s_tap,), (self.t_tap,)

    def terms(self, batch, student, teacher):
        return {"sp": sp_loss(student[self.s_tap], teacher[self.t_tap])}
