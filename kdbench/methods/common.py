"""Building blocks shared by the method plugins (reference/methods.md section 2), each a plain function of tensors
or a small nn.Module, so methods and tests import them from one place. Not a method (nothing registers here).

  - match_spatial(a, b)      the "spatial-mismatch rule" (AT, NST, VID, FT, FSP): adaptive-average-pool the larger
                             map to the smaller
  - attention_map(f, p)      AT's spatial attention: L2-normalised channel mean of f^p (not |f|^p), flattened over H*W
  - ConvReg(s, t)            FitNet's hint regressor (conv/transposed conv chosen from the spatial sizes, BN, ReLU);
                             AB's connectors use it without the ReLU
  - feature_map_shapes(...)  checks that taps are (C, H, W) maps and raises IncompatibleModels otherwise
  - stage_pairs(...)         which taps a method pairs up (stage lists aligned the way RepDistiller/mdistiller align
                             them), with errors that name the method, both models and the offending shapes
  - classifier_parameters / feature_parameters, warmup_factor (DKD/ReviewKD's linear ramp)
  - standardize_logits(z)    LSKD's logit Z-score (the logit_standardization option of kd, dkd, mlkd, ctkd)
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import PairInfo


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with the map of larger height adaptive-average-pooled to the other's (H, W); equal heights pass through.

    This is the rule AT, NST, VID, FT and FSP use in RepDistiller/mdistiller when student and teacher maps differ.
    Only the spatial dims change; channels and batch are untouched.
    """
    ha, hb = a.shape[-2], b.shape[-2]
    if ha > hb:
        a = F.adaptive_avg_pool2d(a, b.shape[-2:])
    elif hb > ha:
        b = F.adaptive_avg_pool2d(b, a.shape[-2:])
    return a, b


def attention_map(f: torch.Tensor, p: float = 2.0, eps: float = 1e-12) -> torch.Tensor:
    """(N, H*W): the channel mean of f^p per position, flattened and L2-normalised per sample (Zagoruyko & Komodakis).

    With p = 2 (the benchmark setting) the sign of f does not matter. `eps` is F.normalize's norm floor.
    """
    return F.normalize(f.pow(p).mean(1).flatten(1), dim=1, eps=eps)


def conv_reg_layer(s_shape: Sequence[int], t_shape: Sequence[int]) -> nn.Module:
    """The conv that maps a student (C_s, H_s, W_s) map onto a teacher (C_t, H_t, W_t) map (RD/MD ConvReg rule).

      H_s == 2*H_t  -> Conv 3x3, stride 2, pad 1
      2*H_s == H_t  -> ConvTranspose 4x4, stride 2, pad 1
      H_s >= H_t    -> Conv with kernel (1+H_s-H_t, 1+W_s-W_t) (1x1 when the sizes are equal)
      otherwise     -> ValueError (the caller turns it into IncompatibleModels)
    Every conv has a bias.
    """
    c_s, h_s, w_s = s_shape
    c_t, h_t, w_t = t_shape
    if h_s == 2 * h_t:
        return nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
    if 2 * h_s == h_t:
        return nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
    if h_s >= h_t and w_s >= w_t:
        return nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t))
    raise ValueError(f"no hint regressor maps a student map {tuple(s_shape)} onto a teacher map {tuple(t_shape)} "
                     f"(needs H_s = 2*H_t, 2*H_s = H_t, or H_s >= H_t)")


class ConvReg(nn.Module):
    """FitNet's hint regressor: conv_reg_layer(s_shape, t_shape), BatchNorm(C_t), then ReLU (if use_relu).

    AB uses the same module without the ReLU. Parameters for resnet8x4 stage2 -> resnet32x4 stage2 (both
    (128, 16, 16)): 1x1 conv 128*128 + bias 128 + BN 2*128 = 16,768.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True):
        super().__init__()
        self.conv = conv_reg_layer(s_shape, t_shape)
        self.bn = nn.BatchNorm2d(t_shape[0])
        self.use_relu = use_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.use_relu else x


def feature_map_shapes(pair, method: str, student_taps: Sequence[str], teacher_taps: Sequence[str]
                       ) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """(student shapes, teacher shapes) of the taps, after checking each is a (C, H, W) map on both sides.

    Raises pair.incompatible(...) (IncompatibleModels, naming method, models and the offending shapes) when a tap
    is missing or is not a feature map (e.g. an MLP's hidden vectors), or when the two lists differ in length.
    """
    if pair.teacher_shapes is None:
        raise pair.incompatible(method, "it needs a teacher")
    if len(student_taps) != len(teacher_taps):
        raise pair.incompatible(method, f"the student has {len(student_taps)} feature levels {list(student_taps)} "
                                        f"but the teacher has {len(teacher_taps)} {list(teacher_taps)}")
    shapes = []
    for side, taps, table in (("student", student_taps, pair.student_shapes), ("teacher", teacher_taps, pair.teacher_shapes)):
        side_shapes = []
        for tap in taps:
            shape = table.get(tap)
            if shape is None or len(shape) != 3:
                have = "missing" if shape is None else f"shape {tuple(shape)}"
                raise pair.incompatible(method, f"it needs (C, H, W) feature maps, but the {side}'s tap '{tap}' is {have}")
            side_shapes.append(tuple(shape))
        shapes.append(side_shapes)
    return shapes[0], shapes[1]


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



def standardize_logits(z: torch.Tensor, eps: float = 1e-7, unbiased: bool = True) -> torch.Tensor:
    """LSKD's Z-score of each row of logits (Sun et al. CVPR 2024, logit-standardization-KD `normalize`):

        Z(z) = (z - mean_c z) / (eps + std_c z),   std unbiased (N - 1) as torch.std, eps added to the std (not
                                                   under the root), so a constant row maps to zeros, not NaN.

    A plain function of the (N, C) logits; `lskd` and the `logit_standardization` option of kd, dkd, mlkd and ctkd
    apply it to both the student's and the teacher's logits inside their KD-type terms only (CE keeps the raw
    logits). `unbiased=False` divides by N instead.
    """
    return (z - z.mean(dim=-1, keepdim=True)) / (eps + z.std(dim=-1, keepdim=True, unbiased=unbiased))
