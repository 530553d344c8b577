"""Zhang, Song, Gao, Chen, Bao & Ma, ICCV 2019, "Be Your Own Teacher: Improve the Performance of Convolutional
Neural Networks via Self Distillation" (BYOT). The authors released no code; kdbench follows MMRazor's port
(open-mmlab/mmrazor configs/distill/mmcls/byot/byot_resnet18_8xb16_cifar100.py, BYOTConnector in
mmrazor/models/architectures/connectors/byot_connector.py, BYOTDistiller, L2Loss, KLDivergence), itself "converted
from" the unofficial luanyunteng/pytorch-be-your-own-teacher. No pre-trained teacher: needs_teacher = False.

Exits. Every student stage but the last (`exits`: null) gets a bottleneck + classifier, a method module (they join
the optimizer and the checkpoint, and count as extra parameters). An exit on a (C, H, W) stage map f, with D the
width of the student's pooled `embedding` (D / C must be a power of two, 2^k) is MMRazor's BYOTConnector
(expansion 1, kernel 3, stride 2):
  attention  SepConv(C -> C, stride 2), BN(C), ReLU, Upsample(x2, bilinear), Sigmoid;   g = attention(f) * f
  scala      k SepConvs doubling the channels, each stride 2 (C -> 2C -> ... -> D), then global average pooling
  F_i        = scala(g) flattened (N, D);   z_i = Linear(D, K)(F_i)
SepConv(a -> b, s) = [ReLU, 3x3 depthwise a -> a stride s, 1x1 a -> a, BN(a)], [ReLU, 3x3 conv a -> b groups a,
1x1 b -> b, BN(b)] (DARTS' separable conv; all convs without bias). MMRazor pools with AvgPool2d(4), which is the
global pool on ResNet18's 4x4 maps; kdbench pools globally on any net. The deepest classifier is the student's own
(F_C = its `embedding`, z_C = its `logits`).

Terms (exits i = 1..E, T = `temperature` 3, the deepest side detached as MMRazor's teacher records are):
  ce         CE(z_C, y)                                               (the base class's)
  exit_ce    sum_i CE(z_i, y)
  exit_kd    sum_i T^2 * (1/N) sum_n KL(softmax(z_C / T) || softmax(z_i / T))                (KLDivergence, batchmean)
  exit_feat  sum_{i in feature_exits} L(F_i, F_C)
  total = ce * ce + exit_ce * exit_ce + exit_kd * exit_kd + exit_feat * exit_feat
MMRazor's weights: ce 1.0 (the head's loss), exit_ce 0.7, exit_kd 0.3 (tau 3), exit_feat 0.03 on the first two exits
and 0 on the third: `feature_exits: [stage1, stage2]`. The paper (Eq. 1): every classifier's CE with (1 - alpha),
the deepest's included (method.weights.ce=0.7), and the feature term on every exit (feature_exits: null); it gives no
values for alpha and lambda (the unofficial code: alpha 0.1, lambda 1e-6, its own masked L2).

The feature loss L (`feature_loss`), per chunk of `feature_chunk` samples (MMRazor's per-GPU batch: 8 GPUs x 16,
each GPU's loss on its 16 samples, their gradients averaged, i.e. the mean over chunks):
  mmrazor  (default, what the config computes) L2Loss(normalize=False, dist=True) is handed the connector's (n, D)
           features and the recorded neck.gap output, which is (n, D, 1, 1): torch.sub broadcasts them to
           (n, D, n, D), so L = sqrt(sum_{i,c} sum_{j,d} (F_i[j, d] - F_C[i, c])^2), every pair of a student element
           and a deepest element of the chunk; computed in closed form without the (n D)^2 tensor, as
           M sum (s - mean s)^2 + M sum (t - mean t)^2 + M^2 (mean s - mean t)^2 with M = n D elements each
  dist     the same torch.dist without the broadcast: sqrt(sum_{j,d} (F_i[j, d] - F_C[j, d])^2)
  paper    the paper's lambda ||F_i - F_C||_2^2: (1/N) sum_n ||F_i[n] - F_C[n]||^2 (no chunks)

Where kdbench differs from MMRazor (not options):
  - MMRazor records `backbone.layerK.1.relu`, whose first call in mmcls' BasicBlock is the ReLU after the block's
    first conv + BN (record index 0), not the stage output; kdbench's exits read the stage outputs (`stageK`), the
    paper's "after each ResBlock stage", because no tap exposes that inner activation;
  - MMRazor trains with AutoAugment + Cutout (cifar100_bs16_auto_aug.py); kdbench's data pipeline has crop + flip
    only (see conf/experiment/byot_cifar100.yaml).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError
from kdbench.models import count_parameters

FEATURE_LOSSES = ("mmrazor", "dist", "paper")


# ----------------------------------------------------------------------------- plain losses


def exit_ce_loss(exit_logits: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """sum_i mean_n CE(z_i[n], y[n]) over the exits' logits."""
    return sum(F.cross_entropy(z, targets) for z in exit_logits)


def exit_kd_loss(exit_logits: Sequence[torch.Tensor], final_logits: torch.Tensor, temperature: float = 3.0
                 ) -> torch.Tensor:
    """sum_i T^2 * (1/N) sum_n KL(softmax(z_C[n] / T) || softmax(z_i[n] / T)); z_C detached (MMRazor KLDivergence,
    reduction batchmean)."""
    log_p_t = F.log_softmax(_wide(final_logits.detach()) / temperature, dim=1)
    return sum(F.kl_div(F.log_softmax(_wide(z) / temperature, dim=1), log_p_t, reduction="batchmean", log_target=True)
               for z in exit_logits) * temperature**2


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32 or wider (autocast's bf16/fp16 outputs are promoted for the loss)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _chunks(n: int, chunk: Optional[int]) -> list[slice]:
    if not chunk or chunk >= n:
        return [slice(0, n)]
    return [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def feature_l2_loss(f_s: torch.Tensor, f_t: torch.Tensor, mode: str = "mmrazor", chunk: Optional[int] = 16
                    ) -> torch.Tensor:
    """BYOT's feature term between an exit's (N, D) features and the deepest ones (detached); see the module
    docstring for the three modes. `chunk`: samples per chunk for mmrazor/dist (None: the whole batch); the loss is
    the mean over chunks."""
    if mode not in FEATURE_LOSSES:
        raise KDBenchError(f"byot: feature_loss must be one of {list(FEATURE_LOSSES)}, got {mode!r}")
    s = _wide(f_s.flatten(1))
    t = f_t.detach().flatten(1).to(s.dtype)
    if s.shape != t.shape:
        raise KDBenchError(f"byot: exit features {tuple(s.shape)} and deepest features {tuple(t.shape)} differ")
    if mode == "paper":
        return (s - t).pow(2).sum(1).mean()
    parts = []
    for sl in _chunks(s.shape[0], chunk):
        a, b = s[sl], t[sl]
        if mode == "dist":
            parts.append((a - b).pow(2).sum().sqrt())
        else:  # every (student element, deepest element) pair of the chunk
            m = a.numel()
            ma, mb = a.mean(), b.mean()
            total = m * (a - ma).pow(2).sum() + m * (b - mb).pow(2).sum() + m * m * (ma - mb).pow(2)
            parts.append(total.sqrt())
    return torch.stack(parts).mean()


def byot_feature_loss(exit_features: Sequence[torch.Tensor], final_features: torch.Tensor, mode: str = "mmrazor",
                      chunk: Optional[int] = 16) -> torch.Tensor:
    """sum over the given exits of feature_l2_loss(F_i, F_C)."""
    return sum(feature_l2_loss(f, final_features, mode, chunk) for f in exit_features)


# ----------------------------------------------------------------------------- exits


class SepConv(nn.Sequential):
    """DARTS' separable conv as MMRazor's DartsSepConv(kernel 3): two ReLU-depthwise-pointwise-BN halves, the first
    with the stride, the second changing the width (a grouped 3x3 conv a -> b with groups a)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__(
            nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                          nn.Conv2d(c_in, c_in, 1, bias=False), nn.BatchNorm2d(c_in)),
            nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, c_out, 3, 1, 1, groups=c_in, bias=False),
                          nn.Conv2d(c_out, c_out, 1, bias=False), nn.BatchNorm2d(c_out)))


class ByotExit(nn.Module):
    """MMRazor's BYOTConnector (expansion 1, kernel 3, stride 2) with a global pool: (N, C, H, W) -> ((N, D), (N, K))."""

    def __init__(self, c_in: int, c_out: int, num_classes: int):
        super().__init__()
        steps = math.log2(c_out / c_in) if c_out >= c_in else -1.0
        if steps < 0 or not float(steps).is_integer():
            raise ValueError(f"the deepest width {c_out} is not the exit's width {c_in} times a power of two")
        self.attention = nn.Sequential(SepConv(c_in, c_in, 2), nn.BatchNorm2d(c_in), nn.ReLU(),
                                       nn.Upsample(scale_factor=2, mode="bilinear"), nn.Sigmoid())
        self.scala = nn.Sequential(*[SepConv(c_in * 2**i, c_in * 2**(i + 1), 2) for i in range(int(steps))],
                                   nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(c_out, num_classes)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.scala(self.attention(f) * f).flatten(1)
        return feat, self.fc(feat)


# ----------------------------------------------------------------------------- the method


@register_method("byot")
class BYOT(Method):
    paper = "Zhang et al., Be Your Own Teacher: Improve the Performance of CNNs via Self Distillation, ICCV 2019"
    code = "open-mmlab/mmrazor configs/distill/mmcls/byot (no official code)"
    needs_teacher = False

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        name = self.method_name
        self.temperature = float(cfg.get("temperature", 3.0))
        self.feature_loss = str(cfg.get("feature_loss", "mmrazor"))
        if self.feature_loss not in FEATURE_LOSSES:
            raise KDBenchError(f"byot: method.feature_loss must be one of {list(FEATURE_LOSSES)}, got "
                               f"{self.feature_loss!r}")
        chunk = cfg.get("feature_chunk", 16)
        self.feature_chunk = int(chunk) if chunk else None
        stages = tuple(pair.student.stage_names)
        exits = cfg.get("exits")
        self.exit_taps = tuple(stages[:-1]) if exits is None else tuple(str(e) for e in exits)
        if not self.exit_taps:
            raise pair.incompatible(name, f"{pair.student_name} has {len(stages)} stage(s) {list(stages)}: no stage "
                                          f"before the last to put an exit on")
        unknown = [t for t in self.exit_taps if t not in pair.student_shapes]
        if unknown:
            raise pair.incompatible(name, f"exit tap(s) {unknown} are not taps of {pair.student_name} (it has: "
                                          f"{', '.join(pair.student_shapes)})")
        feature_exits = cfg.get("feature_exits")
        self.feature_taps = self.exit_taps if feature_exits is None else \
            tuple(t for t in self.exit_taps if t in {str(e) for e in feature_exits})
        if "embedding" not in pair.student_shapes:
            raise pair.incompatible(name, f"{pair.student_name} has no pooled `embedding` tap (the deepest features)")
        dim = pair.student_shapes["embedding"]
        if len(dim) != 1:
            raise pair.incompatible(name, f"the deepest features must be a vector, {pair.student_name}'s embedding is "
                                          f"{tuple(dim)}")
        exits_built = []
        for tap in self.exit_taps:
            shape = tuple(pair.student_shapes[tap])
            if len(shape) != 3 or shape[1] % 2 or shape[2] % 2:
                raise pair.incompatible(name, f"an exit needs a (C, H, W) map of even H and W (stride 2, then x2 "
                                              f"upsampling), {pair.student_name}'s {tap} is {shape}")
            try:
                exits_built.append(ByotExit(shape[0], dim[0], pair.num_classes))
            except ValueError as err:
                raise pair.incompatible(name, f"{tap} {shape} of {pair.student_name}: {err}") from None
        self.exits = nn.ModuleList(exits_built)
        self.student_taps = tuple(dict.fromkeys((*self.exit_taps, "embedding")))

    def exit_outputs(self, student) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [head(student[tap]) for head, tap in zip(self.exits, self.exit_taps)]

    def terms(self, batch, student, teacher):
        outs = self.exit_outputs(student)
        logits = [z for _, z in outs]
        feats = [f for (f, _), tap in zip(outs, self.exit_taps) if tap in self.feature_taps]
        terms = {"exit_ce": exit_ce_loss(logits, batch.targets),
                 "exit_kd": exit_kd_loss(logits, student["logits"], self.temperature)}
        terms["exit_feat"] = (byot_feature_loss(feats, student["embedding"], self.feature_loss, self.feature_chunk)
                              if feats else student["embedding"].sum() * 0.0)
        return terms

    def _exit_logits(self, i: int):
        tap, head = self.exit_taps[i], self.exits[i]
        return lambda student, inputs: head(student.forward_taps(inputs, (tap,))[tap])[1]

    def extra_heads(self):
        return {f"exit{i + 1}": self._exit_logits(i) for i in range(len(self.exits))}

    def record_fields(self):
        return {"evaluated_head": "the deepest classifier (the student's own fc)",
                "exits": {f"exit{i + 1}": tap for i, tap in enumerate(self.exit_taps)},
                "exit_params": {f"exit{i + 1}": count_parameters(head) for i, head in enumerate(self.exits)}}
