"""Liu, Cao, Li, Yuan, Hu, Li & Duan, CVPR 2019, "Knowledge Distillation via Instance Relationship Graph" (IRG).

The official code is Caffe (yufanLIU/IRG); kdbench follows the PyTorch re-implementation in
AberHu/Knowledge-Distillation-Zoo `kd_losses/irg.py` (its "one-to-one" mode) and its CIFAR script `train_kd.py`
(w_irg_vert 0.1, w_irg_edge 5, w_irg_tran 5, lambda_kd 1). Features: the last two stage maps f1, f2 (the zoo's rb2,
rb3 of a CIFAR ResNet), the pooled embedding e and the logits z, on both nets.

  vertex          MSE(z_s, z_t)                                         (mean over every element)
  edge            (MSE(E(e_s), E(e_t)) + MSE(E(f1_s), E(f1_t)) + MSE(E(f2_s), E(f2_t))) / 3, with
                  E(x)_ij = ||x_i - x_j||^2 over the flattened samples (clamped at 1e-12), diagonal set to 0, divided
                  by its largest entry (the instance relationship graph's edges)
  transformation  MSE(T_s, T_t), T_n = ||pool(f1_n) - red(f2_n)||^2 per sample (clamped at 1e-12), divided by its
                  largest value over the batch: how far each instance moves from one layer to the next. pool =
                  adaptive average pooling of f1 to f2's H x W when f1 is larger; red = the channel reduction of f2
                  to f1's width. The zoo averages adjacent channel pairs ((f2[:, 0::2] + f2[:, 1::2]) / 2, only for
                  C2 = 2 C1); kdbench averages adjacent groups (adaptive average pooling over the channel axis),
                  identical for C2 = 2 C1 and also defined for other ratios (or pools f1 when C1 > C2).
total = ce * CE + irg_vertex * vertex + irg_edge * edge + irg_transformation * transformation (ce 1, 0.1, 5, 5).
Squared distances throughout (the zoo calls every distance with squared=True). No trainable parameters.
Paper vs code: the paper's IRG also has many-to-one / one-to-many transformation modes and per-layer weights; the
zoo implements one-to-one only, and so does kdbench.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdbench.distill import Method, register_method
from kdbench.methods.common import stage_pairs


def irg_edge_matrix(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(N, N) squared Euclidean distances between the flattened samples, clamped at eps, zero diagonal, / its max."""
    x = x.flatten(1)
    sq = x.pow(2).sum(1)
    dist = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * x @ x.t()).clamp(min=eps)
    dist = dist * (1 - torch.eye(len(x), dtype=dist.dtype, device=dist.device))
    return dist / dist.max()


def _reduce_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Average adjacent channel groups of an (N, C, H, W) map down to `channels` (adaptive pooling over C)."""
    n, c, h, w = x.shape
    if c == channels:
        return x
    flat = x.permute(0, 2, 3, 1).reshape(n * h * w, 1, c)
    return F.adaptive_avg_pool1d(flat, channels).reshape(n, h, w, channels).permute(0, 3, 1, 2)


def irg_transformation_vector(f1: torch.Tensor, f2: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(N,) squared distance between each sample's earlier map f1 and later map f2 (matched in size and width),
    clamped at eps, divided by its batch maximum."""
    if f1.shape[-2] > f2.shape[-2]:
        f1 = F.adaptive_avg_pool2d(f1, f2.shape[-2:])
    elif f2.shape[-2] > f1.shape[-2]:
        f2 = F.adaptive_avg_pool2d(f2, f1.shape[-2:])
    if f1.shape[1] < f2.shape[1]:
        f2 = _reduce_channels(f2, f1.shape[1])
    elif f1.shape[1] > f2.shape[1]:
        f1 = _reduce_channels(f1, f2.shape[1])
    dist = (f1.flatten(1) - f2.flatten(1)).pow(2).sum(1).clamp(min=eps)
    return dist / dist.max()


def irg_vertex_loss(z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(z_s, z_t.detach())


def irg_edge_loss(s_feats, t_feats) -> torch.Tensor:
    """Mean over the levels of MSE(E(s), E(t)) (the zoo: embedding, f1, f2)."""
    losses = [F.mse_loss(irg_edge_matrix(s), irg_edge_matrix(t.detach())) for s, t in zip(s_feats, t_feats, strict=True)]
    return sum(losses) / len(losses)


def irg_transformation_loss(s1, s2, t1, t2) -> torch.Tensor:
    return F.mse_loss(irg_transformation_vector(s1, s2), irg_transformation_vector(t1.detach(), t2.detach()))


@register_method("irg")
class IRG(Method):
    paper = "Liu et al., Knowledge Distillation via Instance Relationship Graph, CVPR 2019"
    code = "AberHu/Knowledge-Distillation-Zoo (re-implementation; the official code is Caffe)"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        if pair.teacher is None:
            raise pair.incompatible(self.method_name, "it needs a teacher")
        pairs = stage_pairs(pair, self.method_name, align="last")
        if len(pairs) < 2:
            raise pair.incompatible(self.method_name, "its transformation term needs two stage maps on each side")
        (s1, t1), (s2, t2) = pairs[-2], pairs[-1]
        self.levels = ((s1, t1), (s2, t2))
        self.student_taps = (s1, s2, "embedding")
        self.teacher_taps = (t1, t2, "embedding")

    def terms(self, batch, student, teacher):
        (s1, t1), (s2, t2) = self.levels
        return {
            "irg_vertex": irg_vertex_loss(student["logits"], teacher["logits"]),
            "irg_edge": irg_edge_loss([student["embedding"], student[s1], student[s2]],
                                      [teacher["embedding"], teacher[t1], teacher[t2]]),
            "irg_transformation": irg_transformation_loss(student[s1], student[s2], teacher[t1], teacher[t2]),
        }
