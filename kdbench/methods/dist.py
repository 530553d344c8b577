"""Huang, You, Wang, Qian & Xu, NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher" (DIST;
hunto/image_classification_sota lib/models/losses/dist_kd.py `DIST`; torchdistill DISTLoss).

DIST matches relations instead of exact probabilities. With y = softmax(z / tau) (B x K) on each side:

    pearson(a, b) = <a - mean a, b - mean b> / (||a - mean a|| * ||b - mean b|| + 1e-8)      (the code's eps, added)
    inter = tau^2 * (1 - (1/B) sum_b pearson(y_s[b, :], y_t[b, :]))     per sample, across its classes
    intra = tau^2 * (1 - (1/K) sum_c pearson(y_s[:, c], y_t[:, c]))     per class, across the batch
    total = ce * CE + inter * inter + intra * intra                        (teacher detached)

The code returns beta * inter + gamma * intra in one term; kdbench logs the two as separate terms with beta and gamma
as their weights. CIFAR-100 (configs/strategies/distill/dist_cifar.yaml): `kd: dist_t4` (tau 4, beta = gamma = 1) with
kd_loss_weight 2 and ori_loss_weight 1, i.e. weights ce 1, inter 2, intra 2. (The paper's ImageNet setting is tau 1,
beta = gamma = 1; torchdistill's DISTLoss clamps the norm product instead of adding eps, a ~1e-7 relative difference.)
The intra term is a batch statistic: its value depends on the batch composition (a batch of 1 has no class variance).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b: centred dot / (product of norms + eps); shape (N,)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def _probs(z_s, z_t, tau):
    return F.softmax(z_s / tau, dim=1), F.softmax(z_t.detach() / tau, dim=1)


def dist_inter_loss(z_s: torch.Tensor, z_t: torch.Tensor, tau: float = 4.0, eps: float = 1e-8) -> torch.Tensor:
    """tau^2 * (1 - mean over samples of the Pearson correlation between the two posteriors of a sample)."""
    y_s, y_t = _probs(z_s, z_t, tau)
    return tau**2 * (1.0 - pearson_rows(y_s, y_t, eps).mean())


def dist_intra_loss(z_s: torch.Tensor, z_t: torch.Tensor, tau: float = 4.0, eps: float = 1e-8) -> torch.Tensor:
    """tau^2 * (1 - mean over classes of the Pearson correlation of that class's probabilities across the batch)."""
    y_s, y_t = _probs(z_s, z_t, tau)
    return tau**2 * (1.0 - pearson_rows(y_s.t(), y_t.t(), eps).mean())


@register_method("dist")
class DIST(Method):
    """Terms `inter` (beta) and `intra` (gamma) next to the base class's `ce`."""
    paper = "Huang et al., Knowledge Distillation from A Stronger Teacher (DIST), NeurIPS 2022"
    code = "hunto/image_classification_sota lib/models/losses/dist_kd.py"

    teacher_taps = ("logits",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.tau = float(cfg.tau)
        self.eps = float(cfg.eps)
        if self.tau <= 0:
            raise KDBenchError(f"dist: method.tau must be > 0, got {self.tau}")
        if pair.num_classes < 2:
            raise pair.incompatible("dist", f"correlations over classes need at least 2 classes, got {pair.num_classes}")

    def terms(self, batch, student, teacher):
        z_s, z_t = student["logits"], teacher["logits"]
        return {"inter": dist_inter_loss(z_s, z_t, self.tau, self.eps),
                "intra": dist_intra_loss(z_s, z_t, self.tau, self.eps)}
