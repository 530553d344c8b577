"""Ahn et al. 2019, "Variational Information Distillation for Knowledge Transfer" (RepDistiller `vid`, mdistiller VID).

Features: every stage output, paired first-to-first (RD's zip over feat[1:-1]); the larger map is average-pooled
to the smaller. Per level a regressor predicts the teacher map's mean from the student's:
  mu = Conv1x1(C_s->C_t) - ReLU - Conv1x1(C_t->C_t) - ReLU - Conv1x1(C_t->C_t)   (no biases; middle width C_t)
with a per-channel variance sigma^2_c = softplus(alpha_c) + eps, alpha_c initialised so sigma^2 = 5 (eps 1e-5).
Loss per level = mean over N*C*H*W of 0.5 * ((mu - t)^2 / sigma^2_c + log sigma^2_c); summed over levels, weight 1.

RD trains alpha (258,496 extra parameters for resnet32x4 -> resnet8x4); mdistiller keeps it in a plain list, so
the variance stays 5.0 (258,048 parameters): `fixed_variance: true` reproduces that.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.methods.common import match_spatial, stage_pairs


def vid_nll(mean: torch.Tensor, target: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """mean over all elements of 0.5 * ((mean - target)^2 / var_c + log var_c); variance is per channel (C,)."""
    var = variance.view(1, -1, 1, 1)
    return torch.mean(0.5 * ((mean - target.detach()) ** 2 / var + torch.log(var)))


def softplus_variance(alpha: torch.Tensor, eps: float) -> torch.Tensor:
    return F.softplus(alpha) + eps


class VIDRegressor(nn.Module):
    """One level: the mean regressor plus the per-channel (log-)variance parameter alpha."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, init_var: float = 5.0, eps: float = 1e-5, learn_var: bool = True):
        super().__init__()
        self.regressor = nn.Sequential(nn.Conv2d(c_in, c_mid, 1, bias=False), nn.ReLU(),
                                       nn.Conv2d(c_mid, c_mid, 1, bias=False), nn.ReLU(),
                                       nn.Conv2d(c_mid, c_out, 1, bias=False))
        alpha = torch.full((c_out,), math.log(math.exp(init_var - eps) - 1.0))
        if learn_var:
            self.alpha = nn.Parameter(alpha)
        else:
            self.register_buffer("alpha", alpha)
        self.eps = eps

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s, f_t = match_spatial(f_s, f_t)
        return vid_nll(self.regressor(f_s), f_t, softplus_variance(self.alpha, self.eps))


@register_method("vid")
class VID(Method):
    paper = "Ahn et al., Variational Information Distillation for Knowledge Transfer, CVPR 2019"
    code = "HobbitLong/RepDistiller distiller_zoo/VID.py; megvii-research/mdistiller VID"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.pairs = stage_pairs(pair, self.method_name, align="first")
        self.student_taps = tuple(s for s, _ in self.pairs)
        self.teacher_taps = tuple(t for _, t in self.pairs)
        init_var, eps = float(cfg.get("init_pred_var", 5.0)), float(cfg.get("eps", 1e-5))
        learn = not bool(cfg.get("fixed_variance", False))
        self.levels = nn.ModuleList(
            VIDRegressor(pair.student_shapes[s][0], pair.teacher_shapes[t][0], pair.teacher_shapes[t][0], init_var, eps, learn)
            for s, t in self.pairs)

    def terms(self, batch, student, teacher):
        loss = sum(level(student[s], teacher[t]) for level, (s, t) in zip(self.levels, self.pairs))
        return {"vid": loss}
