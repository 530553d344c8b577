"""Lee, Kim & Song 2018, "Self-supervised Knowledge Distillation Using Singular Value Decomposition"
(RepDistiller `kdsvd`, mdistiller KDSVD; port of the authors' TensorFlow code).

Features: every stage output, paired first-to-first. Per level and sample a matrix is built from the map and
decomposed by SVD; the teacher keeps k = 1 singular triplet, the student k + 3. Kept singular vectors are
re-normalised, the kept singular values normalised to unit L2 norm. Each student right-singular vector set is
aligned to the teacher's (for each teacher vector, the student vector of largest |cosine|, with its sign), and both
are scaled by the teacher's normalised singular values. For consecutive levels (i > 0) an RBF between the v's of
levels i and i-1, exp(-(v_i[:, :, None] - v_{i-1}[:, None, :])^2 / 8), is matched:
  loss = sum_levels sum (RBF_s - RBF_t)^2 (non-finite entries zeroed) / N.

reshape: rd (default) builds the (HW x C) matrix, so channels are the right-singular space (RepDistiller);
reshape: md builds (C*H x W) as mdistiller does (the SVD then runs over the width, a different quantity).
The student's vectors are matched to the teacher's by cosine, so paired stages need equal channels (rd) or equal
widths (md); other pairs raise IncompatibleModels (RepDistiller/mdistiller would fail inside the matmul).
"""
import torch
import torch.nn.functional as F

from kdbench.distill import Method, register_method
from kdbench.methods.common import shape_str, stage_pairs


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def svd_features(f: torch.Tensor, n: int, reshape: str = "rd") -> tuple[torch.Tensor, torch.Tensor]:
    """(singular values (N, n) L2-normalised, right singular vectors (N, D, n) column-normalised) of each sample."""
    b, c, h, w = f.shape
    if f.dtype in (torch.float16, torch.bfloat16):
        f = f.float()
    if reshape == "rd":
        x = f.reshape(b, c, h * w).transpose(1, 2)  # (N, HW, C)
    elif reshape == "md":
        x = f.reshape(b, c * h, w)  # (N, C*H, W)
    else:
        raise ValueError(f"kdsvd reshape must be 'rd' or 'md', got '{reshape}'")
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    v = _finite(vh.transpose(1, 2))
    s = _finite(s)
    return F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)


def align_singular_vectors(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """For each teacher vector, the student vector with the largest |cosine|, times the cosine's sign: (N, D, k_t)."""
    cosine = v_s.transpose(1, 2) @ v_t  # (N, k_s, k_t)
    best = cosine.abs().amax(dim=1, keepdim=True)
    select = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
    return v_s @ select


def kdsvd_loss(g_s, g_t, k: int = 1, reshape: str = "rd") -> torch.Tensor:
    prev_s = prev_t = None
    total = 0.0
    for i, (f_s, f_t) in enumerate(zip(g_s, g_t)):
        s_t, v_t = svd_features(f_t.detach(), k, reshape)
        _, v_s = svd_features(f_s, k + 3, reshape)
        v_s = align_singular_vectors(v_s, v_t)
        scale = s_t.unsqueeze(1)  # (N, 1, k)
        v_t, v_s = v_t * scale, v_s * scale
        if i > 0:
            rbf_s = torch.exp(-(v_s.unsqueeze(2) - prev_s.unsqueeze(1)).pow(2) / 8)
            rbf_t = torch.exp(-(v_t.unsqueeze(2) - prev_t.unsqueeze(1)).pow(2) / 8)
            total = total + _finite((rbf_s - rbf_t.detach()).pow(2)).sum()
        prev_s, prev_t = v_s, v_t
    return total / g_s[0].shape[0]


@register_method("kdsvd")
class KDSVD(Method):
    paper = "Lee, Kim & Song, Self-supervised Knowledge Distillation Using Singular Value Decomposition, ECCV 2018"
    code = "HobbitLong/RepDistiller distiller_zoo/KDSVD.py; megvii-research/mdistiller KDSVD"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.k = int(cfg.get("k", 1))
        self.reshape = str(cfg.get("reshape", "rd"))
        if self.reshape not in ("rd", "md"):
            raise ValueError(f"method.reshape must be 'rd' or 'md', got '{self.reshape}'")
        self.pairs = stage_pairs(pair, self.method_name, align="first")
        if len(self.pairs) < 2:
            raise pair.incompatible(self.method_name, f"it compares consecutive stages, but only {len(self.pairs)} stage pair(s) exist")
        for s, t in self.pairs:  # the student's singular vectors are compared with the teacher's by cosine
            ss, ts = pair.student_shapes[s], pair.teacher_shapes[t]
            dim, what = (0, "channels") if self.reshape == "rd" else (2, "widths")
            if ss[dim] != ts[dim]:
                raise pair.incompatible(self.method_name, f"reshape '{self.reshape}' needs equal {what} per stage, but student "
                                                          f"{s} is {shape_str(ss)} and teacher {t} is {shape_str(ts)}")
        self.student_taps = tuple(s for s, _ in self.pairs)
        self.teacher_taps = tuple(t for _, t in self.pairs)

    def terms(self, batch, student, teacher):
        loss = kdsvd_loss([student[s] for s, _ in self.pairs], [teacher[t] for _, t in self.pairs], self.k, self.reshape)
        return {"kdsvd": loss}
