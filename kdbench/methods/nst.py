"""Huang & Wang 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer" (RD `nst`, MD NST).

Features: every stage output (RD feat[1:-1], MD feats[1:]), paired first-to-first as RD's zip does. Per level: the
larger map is average-pooled to the smaller size, each map is reshaped to N x C x HW and every channel vector is
L2-normalised over HW. With the polynomial kernel k(a, b) = (a . b)^2 the loss is the squared MMD
  mean k(t_i, t_j) + mean k(s_i, s_j) - 2 mean k(s_i, t_j)
(means over N x C_x x C_y, teacher term detached). Summed over levels; benchmark weight 50 (RD and MD agree).
"""
import torch
import torch.nn.functional as F

from kdbench.distill import Method, register_method
from kdbench.methods.common import match_spatial, stage_pairs


def poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a_i . b_j)^2 for channel vectors a (N, Ca, D), b (N, Cb, D) -> (N, Ca, Cb)."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2)


def nst_level_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    f_s, f_t = match_spatial(f_s, f_t.detach())
    s = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
    t = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)
    return poly_kernel(t, t).mean().detach() + poly_kernel(s, s).mean() - 2 * poly_kernel(s, t).mean()


def nst_loss(g_s, g_t) -> torch.Tensor:
    """Sum of the per-level NST losses over paired feature maps."""
    return sum(nst_level_loss(s, t) for s, t in zip(g_s, g_t))


@register_method("nst")
class NST(Method):
    paper = "Huang & Wang, Like What You Like: Knowledge Distill via Neuron Selectivity Transfer, arXiv 2017"
    code = "HobbitLong/RepDistiller distiller_zoo/NST.py; megvii-research/mdistiller NST"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.pairs = stage_pairs(pair, self.method_name, align="first")
        self.student_taps = tuple(s for s, _ in self.pairs)
        self.teacher_taps = tuple(t for _, t in self.pairs)

    def terms(self, batch, student, teacher):
        loss = nst_loss([student[s] for s, _ in self.pairs], [teacher[t] for _, t in self.pairs])
        return {"nst": loss}
