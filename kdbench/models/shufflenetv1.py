"""ShuffleNetV1 of the KD benchmarks (RepDistiller/mdistiller `ShuffleNetv1.py`, `ShuffleV1`: groups 3).

Stem conv1x1 (3 -> 24) + BN + ReLU at 32 px; stages of out 240/480/960 with 4/8/4 bottleneck units; the first
unit of each stage has stride 2 and concatenates an AvgPool3x3-s2 shortcut (its conv branch outputs out - in
channels); bottleneck width out/4; channel shuffle after the first 1x1 group conv (groups=1 when the input has 24
channels); depthwise 3x3; average pool, Linear(960 -> classes). Default PyTorch init, as in the reference. Module
names match the reference (conv1, bn1, layerN.i.{conv,bn}K, linear), so the benchmarks' checkpoints load as they are.

Taps: stem, stage1..3 (after the last unit's ReLU), stage1_pre..stage3_pre (that ReLU's input: the residual sum, or
the concatenation for a stride-2 unit), embedding (pooled 960), logits. bn_before_relu() is not implemented (the
reference raises for ShuffleNets too).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models.base import TapModel
from kdbench.models.registry import register_model


class ShuffleBlock(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        """Channel shuffle: [N,C,H,W] -> [N,g,C/g,H,W] -> [N,C/g,g,H,W] -> [N,C,H,W]."""
        n, c, h, w = x.shape
        g = self.groups
        return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """Returns the pre-ReLU output (sum, or concatenation for stride 2)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, stem_channels: int = 24):
        super().__init__()
        self.stride = stride
        mid_planes = int(out_planes / 4)
        g = 1 if in_planes == stem_channels else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, 3, stride, 1, groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return torch.cat([out, res], 1) if self.stride == 2 else out + res


class ShuffleNetV1(TapModel):
    stage_names = ("stage1", "stage2", "stage3")
    tap_names = ("stem", "stage1", "stage2", "stage3", "stage1_pre", "stage2_pre", "stage3_pre", "embedding", "logits")

    def __init__(self, out_planes: Sequence[int], num_blocks: Sequence[int], groups: int, num_classes: int,
                 input_shape: Sequence[int]):
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        for i, (planes, n) in enumerate(zip(out_planes, num_blocks), start=1):
            layers = []
            for j in range(n):
                cat_planes = in_planes if j == 0 else 0
                layers.append(Bottleneck(in_planes, planes - cat_planes, 2 if j == 0 else 1, groups))
                in_planes = planes
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = the reference's avg_pool2d(4) on 32x32 inputs
        self.linear = nn.Linear(out_planes[-1], num_classes)

    def _forward_taps(self, x, taps):
        x = F.relu(self.bn1(self.conv1(x)))
        out = {"stem": x}
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3), start=1):
            for block in layer:
                pre = block(x)
                x = F.relu(pre)
            out[f"stage{i}_pre"] = pre
            out[f"stage{i}"] = x
        out["embedding"] = self.avgpool(x).flatten(1)
        out["logits"] = self.linear(out["embedding"])
        return out


@register_model("ShuffleV1")
def shufflev1(num_classes, input_shape):
    """ShuffleNetV1, groups 3, out planes 240/480/960, 4/8/4 units (RepDistiller/mdistiller `ShuffleV1`)."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes, input_shape)
