"""Helpers shared by the feature-based method plugins (sp, cc, vid, rkd, pkt, nst, crd, dkd, kdsvd, ab, ofd, reviewkd).

Not a method itself (nothing registers here). What lives here:
  - which taps a method pairs up (stage lists aligned the way RepDistiller/mdistiller align them), with
    IncompatibleModels errors that name the method, both models and the offending shapes
  - the spatial-mismatch rule shared by NST, VID, ... (adaptive-average-pool the larger map to the smaller)
  - the optional Hinton KD term any of these methods can add (`method.weights.kd`, `method.temperature`)
  - ConvReg (kdbench.blocks, FitNet's hint regressor rule) for AB's connectors
  - the student's classifier parameters (AB's pre-training stage trains everything else)
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from kdbench.blocks import ConvReg, match_spatial
from kdbench.distill import PairInfo


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def flat_dim(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def stage_pairs(pair: PairInfo, method: str, align: str = "first", suffix: str = "",
                need_maps: bool = True) -> list[tuple[str, str]]:
    """(student tap, teacher tap) per distilled level, from the models' ordered stage_names.

    align="first" pairs the first min(L_s, L_t) stages, as RepDistiller's zip over feat[1:-1] does;
    align="last" pairs the deepest min(L_s, L_t) stages, as mdistiller's OFD (`_align_list`) does;
    align="equal" requires L_s == L_t. suffix="_pre" selects the pre-activation taps. need_maps requires
    every tap to be a (C, H, W) map.
    """
    s_stages, t_stages = tuple(pair.student.stage_names), tuple(pair.teacher.stage_names)
    if not s_stages or not t_stages:
        raise pair.incompatible(method, f"it needs stage features, but {pair.student_name} has stages {list(s_stages)} "
                                        f"and {pair.teacher_name} has {list(t_stages)}")
    n = min(len(s_stages), len(t_stages))
    if align == "equal" and len(s_stages) != len(t_stages):
        raise pair.incompatible(method, f"it needs the same number of stages, but {pair.student_name} has "
                                        f"{len(s_stages)} ({', '.join(s_stages)}) and {pair.teacher_name} has "
                                        f"{len(t_stages)} ({', '.join(t_stages)})")
    if align == "last":
        s_stages, t_stages = s_stages[-n:], t_stages[-n:]
    else:
        s_stages, t_stages = s_stages[:n], t_stages[:n]
    pairs = [(s + suffix, t + suffix) for s, t in zip(s_stages, t_stages)]
    for side, model, name, taps in (("student", pair.student, pair.student_name, [p[0] for p in pairs]),
                                    ("teacher", pair.teacher, pair.teacher_name, [p[1] for p in pairs])):
        missing = [t for t in taps if t not in model.tap_names]
        if missing:
            raise pair.incompatible(method, f"the {side} {name} lacks tap(s) {missing} (it has: {', '.join(model.tap_names)})")
    if need_maps:
        require_maps(pair, method, pairs)
    return pairs


def require_maps(pair: PairInfo, method: str, pairs: Sequence[tuple[str, str]]) -> None:
    for s, t in pairs:
        ss, ts = pair.student_shapes[s], pair.teacher_shapes[t]
        if len(ss) != 3 or len(ts) != 3:
            raise pair.incompatible(method, f"it needs (C, H, W) feature maps, but student {s} is {shape_str(ss)} "
                                            f"and teacher {t} is {shape_str(ts)}")


def pool_to_smaller(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """If the maps differ in height, adaptive-average-pool the larger one to the smaller's (H, W) (RD's rule)."""
    return match_spatial(f_s, f_t)


class OptionalKD:
    """Mixin: add Hinton's KD term when the config gives `weights.kd` (RD's -a flag; crd_kd uses it)."""

    def _init_kd(self, cfg) -> None:
        self.kd_temperature = float(cfg.get("temperature", 4.0))
        self.with_kd = "kd" in self.weights

    def _kd_terms(self, student, teacher) -> dict[str, torch.Tensor]:
        if not self.with_kd:
            return {}
        from kdbench.methods.kd import kd_loss

        return {"kd": kd_loss(student["logits"], teacher["logits"], self.kd_temperature)}


def conv_reg(s_shape, t_shape, use_relu: bool = True) -> nn.Module:
    """kdbench.blocks.ConvReg for (C, H, W) shapes; ValueError when no regressor rule fits the sizes."""
    return ConvReg(s_shape, t_shape, use_relu=use_relu)


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the final classifier (RD's get_feat_modules() = everything but these)."""
    for attr in ("fc", "classifier", "linear"):
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module) and any(isinstance(m, nn.Linear) for m in module.modules()):
            return list(module.parameters())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return list(linears[-1].parameters()) if linears else []


def feature_parameters(model: nn.Module) -> list[nn.Parameter]:
    head = {id(p) for p in classifier_parameters(model)}
    return [p for p in model.parameters() if id(p) not in head]


def warmup_factor(epoch: int, warmup_epochs: float) -> float:
    """mdistiller's linear ramp min(epoch / warmup, 1) for 1-indexed epochs (0 warm-up epochs = off)."""
    return 1.0 if warmup_epochs <= 0 else min(epoch / warmup_epochs, 1.0)


__all__ = ["stage_pairs", "require_maps", "pool_to_smaller", "OptionalKD", "conv_reg",
           "classifier_parameters", "feature_parameters", "warmup_factor", "shape_str", "flat_dim"]
