"""Miles, Lopez-Rodriguez & Mikolajczyk 2022, "Information Theoretic Representation Distillation" (BMVC; the
CIFAR-100 code roymiles/ITRD `distiller_zoo/IT.py` ITLoss, `helper/loops.py`, `train_student.py`).

Features: the pooled embeddings z_s (C_s), z_t (C_t) (the reference's feat[-1]); embed = Linear(C_s -> C_t) with bias
(65,792 parameters for resnet32x4 -> resnet8x4).
  correlation: s = embed(z_s) (always); each feature standardised over the batch, x^ = (x - mean_N x) / std_N x with
               the UNBIASED std and no epsilon; c_d = sum_n s^_nd t^_nd / N;
               itrd_corr = log2( sum_d (|c_d - 1|^2)^alpha )
  mutual:      s = embed(z_s) only when C_s != C_t, else z_s itself (the reference's `if self.s_dim != self.t_dim`);
               rows L2-normalised (F.normalize, eps 1e-12); G_s = s s^T, G_t = t t^T, G_st = G_s * G_t (elementwise),
               each of G_s, G_st divided by its trace; itrd_mutual = sum (G_s^2 - G_st^2)
Teacher side detached. The loop has no KL term: total = gamma CE + beta (lambda_corr corr + lambda_mutual mutual).
Weights: the README's reproduction command `-b 1.0 -r 1.0 --lambda_corr 2.0 --lambda_mutual 1.0 --alpha_it 1.01`:
ce 1, itrd_corr 2.0, itrd_mutual 1.0, alpha 1.01. (train_student.py's argparse defaults are lambda_mutual 0.05 and
alpha 1.5, with -b required.) A feature that is constant over the batch makes the std 0 and the loss NaN in the
reference; `std_eps` (default 0, the reference) is added to the std when set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method


def standardize_batch(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """(x - mean over the batch) / (unbiased std over the batch + eps), per feature."""
    return (x - x.mean(0)) / (x.std(0) + eps)


def itrd_correlation_loss(s: torch.Tensor, t: torch.Tensor, alpha: float = 1.01, eps: float = 0.0) -> torch.Tensor:
    """log2(sum_d (|c_d - 1|^2)^alpha), c_d = sum_n s^_nd t^_nd / N on batch-standardised features; t detached."""
    n = s.shape[0]
    c = (standardize_batch(s, eps) * standardize_batch(t.detach(), eps)).sum(0) / n
    return torch.log2((c - 1.0).abs().pow(2.0).pow(alpha).sum())


def itrd_mutual_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sum(G_s^2 - G_st^2) with G_s = s^ s^T / tr, G_st = (s^ s^T * t^ t^T) / tr on L2-normalised rows; t detached."""
    s_n, t_n = F.normalize(s), F.normalize(t.detach())
    g_s = s_n @ s_n.t()
    g_st = g_s * (t_n @ t_n.t())
    g_s = g_s / torch.trace(g_s)
    g_st = g_st / torch.trace(g_st)
    return (g_s.pow(2) - g_st.pow(2)).sum()


@register_method("itrd")
class ITRD(Method):
    paper = "Miles, Lopez-Rodriguez & Mikolajczyk, Information Theoretic Representation Distillation, BMVC 2022"
    code = "roymiles/ITRD distiller_zoo/IT.py"
    student_taps = ("embedding",)
    teacher_taps = ("embedding",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        if pair.teacher is None:
            raise pair.incompatible(self.method_name, "it needs a teacher")
        dims = {}
        for side, shapes, model in (("student", pair.student_shapes, pair.student_name),
                                    ("teacher", pair.teacher_shapes, pair.teacher_name)):
            shape = shapes.get("embedding")
            if shape is None or len(shape) != 1:
                raise pair.incompatible(self.method_name, f"it needs the {side}'s pooled embedding vector, and "
                                                          f"{model} has {shape}")
            dims[side] = int(shape[0])
        self.alpha = float(cfg.get("alpha", 1.01))
        self.std_eps = float(cfg.get("std_eps", 0.0))
        self.embed = nn.Linear(dims["student"], dims["teacher"])
        self.embed_mutual = dims["student"] != dims["teacher"]

    def terms(self, batch, student, teacher):
        z_s, z_t = student["embedding"], teacher["embedding"]
        s = self.embed(z_s)
        return {"itrd_corr": itrd_correlation_loss(s, z_t, self.alpha, self.std_eps),
                "itrd_mutual": itrd_mutual_loss(s if self.embed_mutual else z_s, z_t)}
