"""Peng et al. 2019, "Correlation Congruence for Knowledge Distillation" (RepDistiller `correlation`; RD only).

Features: the pooled `embedding` vectors of both networks, each mapped by its own trainable Linear(dim -> 128,
bias, no normalisation); both embeds are trained (65,792 extra parameters for resnet32x4 -> resnet8x4).

variant: reference (default, what RD runs; its README says the code came from the CC authors):
  delta = |e_s - e_t| (N x 128); loss = (1/(N-1)) sum_{i<N} sum_d delta_{i,d} delta_{i+1,d},
  products of consecutive samples in batch order. Weight 0.02.
variant: paper (the paper's eq., as torchdistill's CCKDLoss implements it): correlation matrices from the P-order
  Taylor expansion of the Gaussian RBF kernel, C_ij = exp(-2 gamma) sum_{p=0..P} (2 gamma)^p / p! (e_i . e_j)^p,
  gamma 0.4, P 2; loss = ||C_s - C_t||_F / N^2.
"""
import math

import torch
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.methods.common import flat_dim


def cc_reference_loss(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """RD's Correlation loss: mean over consecutive sample pairs of sum_d |e_s - e_t|_i,d * |e_s - e_t|_{i+1},d."""
    delta = torch.abs(e_s - e_t)
    return torch.mean((delta[:-1] * delta[1:]).sum(1))


def gaussian_correlation(e: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """P-order Taylor expansion of the Gaussian RBF correlation matrix (N x N)."""
    dot = e @ e.t()
    corr = torch.ones_like(dot)
    for p in range(1, order + 1):
        corr = corr + (2 * gamma) ** p / math.factorial(p) * dot.pow(p)
    return corr * math.exp(-2 * gamma)


def cc_paper_loss(e_s: torch.Tensor, e_t: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """||C_s - C_t||_2 (Frobenius) / N^2 with C from gaussian_correlation."""
    n = e_s.shape[0]
    return torch.dist(gaussian_correlation(e_s, gamma, order), gaussian_correlation(e_t, gamma, order), 2) / (n * n)


@register_method("cc")
class CC(Method):
    paper = "Peng et al., Correlation Congruence for Knowledge Distillation, ICCV 2019"
    code = "HobbitLong/RepDistiller distiller_zoo/CC.py"
    student_taps = ("embedding",)
    teacher_taps = ("embedding",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.variant = str(cfg.get("variant", "reference"))
        if self.variant not in ("reference", "paper"):
            raise ValueError(f"method.variant must be 'reference' or 'paper', got '{self.variant}'")
        self.gamma, self.order = float(cfg.get("gamma", 0.4)), int(cfg.get("p_order", 2))
        dim = int(cfg.get("feat_dim", 128))
        self.embed_s = nn.Linear(flat_dim(pair.student_shapes["embedding"]), dim)
        self.embed_t = nn.Linear(flat_dim(pair.teacher_shapes["embedding"]), dim)

    def terms(self, batch, student, teacher):
        e_s = self.embed_s(student["embedding"].flatten(1))
        e_t = self.embed_t(teacher["embedding"].detach().flatten(1))
        loss = cc_reference_loss(e_s, e_t) if self.variant == "reference" else cc_paper_loss(e_s, e_t, self.gamma, self.order)
        return {"cc": loss}
