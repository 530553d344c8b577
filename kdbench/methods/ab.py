"""Heo et al. 2019, "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons"
(RepDistiller `abound`; RD only). Two stages:

1. Pre-training stage (`stage_epochs` = 30 epochs, SGD at the run's base LR held constant, momentum 0.9, wd 5e-4,
   no CE): trains the connectors and the student's feature layers (every student parameter except the final
   classifier, RD's get_feat_modules()) on the AB loss between the PRE-activation stage outputs (`stageN_pre`):
   per level, with margin m = 1, s = connector(student preact), t = teacher preact,
     sum of (s + m)^2 where s > -m and t <= 0, plus (s - m)^2 where s <= m and t > 0,
   times the level weight 2^(l - L + 1) (deepest level 1, then 1/2, 1/4, ...), divided by N, times 3/1000;
   summed over levels. Connector per level: identity when channels and height match, else ConvReg without ReLU
   (0 parameters for resnet32x4 -> resnet8x4). A model without `stageN_pre` taps contributes its `stageN` outputs,
   as RepDistiller ignores preact=True for MobileNetV2, whose stage outputs are linear-bottleneck BN outputs anyway
   (`preact_fallback: false` makes that an IncompatibleModels error instead).
2. Main training: CE only (RD hard-codes the method loss to 0 there; `-b` has no effect). The connectors are
   stage-only and stay out of the main optimizer (trainable_parameters() is empty).
"""
from __future__ import annotations

import torch
from torch import nn

from kdbench.distill import Method, Stage, register_method
from kdbench.methods.common import conv_reg, feature_parameters, shape_str, stage_pairs


def ab_level_loss(source: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """RD's criterion_alternative_l2, summed over every element."""
    target = target.detach()
    loss = ((source + margin) ** 2 * ((source > -margin) & (target <= 0)).to(source.dtype)
            + (source - margin) ** 2 * ((source <= margin) & (target > 0)).to(source.dtype))
    return loss.abs().sum()


def ab_loss(g_s, g_t, margin: float = 1.0) -> torch.Tensor:
    """Sum over levels of 2^(l-L+1) * level loss / N * 3/1000 (g_s already through the connectors)."""
    levels = len(g_s)
    n = g_s[0].shape[0]
    total = 0.0
    for l, (s, t) in enumerate(zip(g_s, g_t)):
        total = total + 2.0 ** (l - levels + 1) * ab_level_loss(s, t, margin) / n / 1000 * 3
    return total


@register_method("ab")
class AB(Method):
    paper = ("Heo et al., Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons, "
             "AAAI 2019")
    code = "HobbitLong/RepDistiller distiller_zoo/AB.py"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.margin = float(cfg.get("margin", 1.0))
        self.stage_epochs = int(cfg.get("stage_epochs", 30))
        stage_lr = cfg.get("stage_lr", None)
        self.stage_lr = float(pair.lr if stage_lr is None else stage_lr)
        base = stage_pairs(pair, self.method_name, align="equal")
        fallback = bool(cfg.get("preact_fallback", True))
        suffixes = []
        for side, model, taps in (("student", pair.student, [s for s, _ in base]), ("teacher", pair.teacher, [t for _, t in base])):
            if all(f"{tap}_pre" in model.tap_names for tap in taps):
                suffixes.append("_pre")
            elif fallback:
                suffixes.append("")  # RD ignores preact=True for models without one (MobileNetV2: linear bottlenecks)
            else:
                raise pair.incompatible(self.method_name, f"the {side} lacks pre-activation taps {[t + '_pre' for t in taps]} "
                                                          f"(it has: {', '.join(model.tap_names)})")
        self.pairs = [(s + suffixes[0], t + suffixes[1]) for s, t in base]
        connectors = []
        for s, t in self.pairs:
            ss, ts = pair.student_shapes[s], pair.teacher_shapes[t]
            if ss[0] == ts[0] and ss[1] == ts[1]:
                connectors.append(nn.Identity())
                continue
            try:
                connectors.append(conv_reg(ss, ts, use_relu=False))
            except ValueError:
                raise pair.incompatible(self.method_name, f"no connector maps student {s} {shape_str(ss)} onto teacher "
                                                          f"{t} {shape_str(ts)}") from None
        self.connectors = nn.ModuleList(connectors)
        self.stage_student_taps = tuple(s for s, _ in self.pairs)
        self.stage_teacher_taps = tuple(t for _, t in self.pairs)
        # main training is CE only: no taps beyond the logits

    def stage_loss(self, batch, student, teacher) -> torch.Tensor:
        g_s = [conn(student[s]) for conn, (s, _) in zip(self.connectors, self.pairs)]
        g_t = [teacher[t] for _, t in self.pairs]
        return ab_loss(g_s, g_t, self.margin)

    def stages(self, student, teacher):
        if self.stage_epochs <= 0:
            return []
        params = list(self.connectors.parameters()) + feature_parameters(student)
        return [Stage("ab_init", self.stage_epochs, self.stage_lr, params, self.stage_loss,
                      self.stage_student_taps, self.stage_teacher_taps)]

    def trainable_parameters(self):
        return []
