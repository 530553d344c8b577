"""Heo et al. 2019, "A Comprehensive Overhaul of Feature Distillation" (mdistiller OFD; not in RepDistiller).

Features: the PRE-activation stage outputs (`stageN_pre`) of both networks, aligned to the deepest
min(L_s, L_t) levels, or to the deepest `levels` of those when set (mdistiller's ImageNet ResNet-50 -> MobileNet-V1
distils 3: it drops the first entry of each `preact_feats`, the ResNet's stem and the MobileNet's first stage, and
aligns the rest from the end; the authors' ImageNet code, clovaai/overhaul-distillation ImageNet/distiller.py,
distils all 4). Connector per level: Conv(k x k, no bias, pad (k-1)/2, init N(0, sqrt(2/(k*k*C_t)))) from C_s
to C_t, then BN(C_t) (weight 1, bias 0): 86,912 extra parameters for resnet32x4 -> resnet8x4 (k = 1).
Margins per teacher channel, computed once at construction from the BN before each teacher ReLU
(teacher.bn_before_relu()), with s = |gamma| and m = beta:
  m - s * phi(m/s) / Phi(-m/s)  if Phi(-m/s) > 0.001, else -3 s     (phi/Phi: standard normal pdf/cdf).
Teacher maps are average-pooled to the student's size. Partial L2 per element (s = connector(student), t = teacher):
  (s - margin)^2 where s > margin and t <= margin; (s - t)^2 where s > t and margin < t <= 0; (s - t)^2 where t > 0.
Reduction: mean over the batch, sum over C*H*W; level i divided by 2^(L-i-1). Benchmark: CE 1 + 0.001 * OFD.
mdistiller puts the teacher in train mode (BN batch statistics, running stats updated, still no grad); so does this
method (teacher_train_mode), unless `teacher_train_mode: false`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.methods.common import stage_pairs


def ofd_margin(bn_weight: torch.Tensor, bn_bias: torch.Tensor) -> torch.Tensor:
    """Per-channel expectation of the negative part of N(beta, gamma^2) (OFD's margin), -3|gamma| when Phi(-m/s) <= 1e-3."""
    s = bn_weight.detach().double().abs()
    m = bn_bias.detach().double()
    ratio = m / s
    cdf = torch.special.ndtr(-ratio)
    pdf = torch.exp(-ratio**2 / 2) / math.sqrt(2 * math.pi)
    margin = torch.where(cdf > 0.001, m - s * pdf / cdf, -3 * s)
    return margin.float()


def ofd_level_loss(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Partial L2, mean over the batch and sum over C*H*W; margin (C,) or broadcastable to (1, C, 1, 1)."""
    target = target.detach()
    margin = margin.to(source).view(1, -1, 1, 1)
    loss = ((source - margin) ** 2 * ((source > margin) & (target <= margin)).to(source.dtype)
            + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0)).to(source.dtype)
            + (source - target) ** 2 * (target > 0).to(source.dtype))
    return loss.abs().mean(dim=0).sum()


def ofd_loss(g_s, g_t, margins) -> torch.Tensor:
    """Sum over levels of ofd_level_loss / 2^(L-i-1), teacher maps pooled to the student's size."""
    levels = len(g_s)
    total = 0.0
    for i, (s, t, m) in enumerate(zip(g_s, g_t, margins)):
        t = F.adaptive_avg_pool2d(t, s.shape[-2:])
        total = total + ofd_level_loss(s, t, m) / 2 ** (levels - i - 1)
    return total


def ofd_connector(c_s: int, c_t: int, kernel_size: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(c_s, c_t, kernel_size, stride=1, padding=(kernel_size - 1) // 2, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kernel_size * kernel_size * c_t)))
    bn = nn.BatchNorm2d(c_t)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


@register_method("ofd")
class OFD(Method):
    paper = "Heo et al., A Comprehensive Overhaul of Feature Distillation, ICCV 2019"
    code = "megvii-research/mdistiller distillers/OFD.py"
    teacher_train_mode = True

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.teacher_train_mode = bool(cfg.get("teacher_train_mode", True))
        self.pairs = stage_pairs(pair, self.method_name, align="last", suffix="_pre")
        levels = cfg.get("levels")
        if levels is not None:
            if not 1 <= int(levels) <= len(self.pairs):
                raise pair.incompatible(self.method_name, f"levels={levels}, but the pair has {len(self.pairs)} "
                                                          f"aligned stage(s)")
            self.pairs = self.pairs[-int(levels):]
        self.student_taps = tuple(s for s, _ in self.pairs)
        self.teacher_taps = tuple(t for _, t in self.pairs)
        try:
            bns = list(pair.teacher.bn_before_relu())
        except NotImplementedError as err:
            raise pair.incompatible(self.method_name, f"its margins need the teacher's BN-before-ReLU layers: {err}") from None
        stages = list(pair.teacher.stage_names)
        if len(bns) != len(stages):
            raise pair.incompatible(self.method_name, f"the teacher {pair.teacher_name} has {len(bns)} BN-before-ReLU "
                                                      f"layers for {len(stages)} stages")
        k = int(cfg.get("kernel_size", 1))
        connectors = []
        for i, (s, t) in enumerate(self.pairs):
            bn = bns[stages.index(t[: -len("_pre")])]
            c_s, c_t = pair.student_shapes[s][0], pair.teacher_shapes[t][0]
            if bn.num_features != c_t:
                raise pair.incompatible(self.method_name, f"teacher {t} has {c_t} channels but its BN-before-ReLU has {bn.num_features}")
            connectors.append(ofd_connector(c_s, c_t, k))
            self.register_buffer(f"margin{i + 1}", ofd_margin(bn.weight, bn.bias))
        self.connectors = nn.ModuleList(connectors)

    @property
    def margins(self) -> list[torch.Tensor]:
        return [getattr(self, f"margin{i + 1}") for i in range(len(self.pairs))]

    def terms(self, batch, student, teacher):
        g_s = [conn(student[s]) for conn, (s, _) in zip(self.connectors, self.pairs)]
        g_t = [teacher[t] for _, t in self.pairs]
        return {"ofd": ofd_loss(g_s, g_t, self.margins)}
