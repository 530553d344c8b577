"""CIFAR ResNets of the KD benchmarks (RepDistiller/mdistiller `resnet.py`): post-activation BasicBlocks, depth 6n+2.

Module names match the reference definitions, so the benchmarks' teacher checkpoints load as they are.
Taps: stem (after ReLU), stage1..3 (after the last block's ReLU), stage1_pre..stage3_pre (the last block's
residual sum before that ReLU), embedding (pooled), logits.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models.base import TapModel
from kdbench.models.registry import register_model


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut; returns the sum before the final ReLU (the stage's preact)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out + (x if self.downsample is None else self.downsample(x))


class CifarResNet(TapModel):
    stage_names = ("stage1", "stage2", "stage3")
    tap_names = ("stem", "stage1", "stage2", "stage3", "stage1_pre", "stage2_pre", "stage3_pre", "embedding", "logits")

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int, input_shape: Sequence[int]):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        inplanes = widths[0]
        for i, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            layers = [BasicBlock(inplanes, planes, stride)] + [BasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

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
        out["logits"] = self.fc(out["embedding"])
        return out

    def bn_before_relu(self):
        return [layer[-1].bn2 for layer in (self.layer1, self.layer2, self.layer3)]


def _register(name: str, depth: int, widths: Sequence[int]) -> None:
    def factory(num_classes, input_shape):
        return CifarResNet(depth, widths, num_classes, input_shape)

    factory.__doc__ = f"CIFAR ResNet depth {depth}, widths {list(widths)}"
    register_model(name)(factory)


for _depth in (8, 14, 20, 26, 32, 44, 56, 110):
    _register(f"resnet{_depth}", _depth, (16, 16, 32, 64))
_register("resnet8x4", 8, (32, 64, 128, 256))
_register("resnet32x4", 32, (32, 64, 128, 256))
