"""CIFAR variants of the ImageNet ResNets (RepDistiller/mdistiller `resnetv2.py`): ResNet50, ResNet18 and ResNet34.

Stem conv3x3 (stride 1) + BN + ReLU and no max-pool, so the four stages run at 32/16/8/4 px on CIFAR; planes
64/128/256/512 (x4 for Bottleneck), strides 1/2/2/2, adaptive average pool, Linear. Module names match the
reference (conv1, bn1, layerN.i.{conv,bn}K, layerN.i.shortcut.{0,1}, linear), so the benchmarks' checkpoints load
as they are. ResNet18 exists only in mdistiller; ResNet34 (BasicBlock [3, 4, 6, 3]) is the data-free papers' CIFAR
teacher (DAFL's `resnet.ResNet34`, DFAD's `ResNet34_8x`, DeepInversion's cifar10 `ResNet34`: the same network).

Taps: stem (after ReLU), stage1..4 (after the last block's ReLU), stage1_pre..stage4_pre (the last block's residual
sum before that ReLU), embedding (pooled), logits.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import nn

from kdbench.models.base import TapModel
from kdbench.models.registry import register_model


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut; returns the sum before the final ReLU."""
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out + self.shortcut(x)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN plus shortcut; returns the sum before the final ReLU."""
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3


class ResNetV2(TapModel):
    stage_names = ("stage1", "stage2", "stage3", "stage4")
    tap_names = ("stem", "stage1", "stage2", "stage3", "stage4",
                 "stage1_pre", "stage2_pre", "stage3_pre", "stage4_pre", "embedding", "logits")

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], num_blocks: Sequence[int], num_classes: int,
                 input_shape: Sequence[int], zero_init_residual: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)), start=1):
            layers = []
            for s in [stride] + [1] * (n - 1):
                layers.append(block(in_planes, planes, s))
                in_planes = planes * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def _layers(self):
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def _forward_taps(self, x, taps):
        x = F.relu(self.bn1(self.conv1(x)))
        out = {"stem": x}
        for i, layer in enumerate(self._layers(), start=1):
            for block in layer:
                pre = block(x)
                x = F.relu(pre)
            out[f"stage{i}_pre"] = pre
            out[f"stage{i}"] = x
        out["embedding"] = self.avgpool(x).flatten(1)
        out["logits"] = self.linear(out["embedding"])
        return out

    def bn_before_relu(self):
        return [layer[-1].last_bn() for layer in self._layers()]


@register_model("ResNet50")
def resnet50_cifar(num_classes, input_shape, zero_init_residual=False):
    """CIFAR ResNet-50: Bottleneck stages [3, 4, 6, 3] (RepDistiller/mdistiller `ResNet50`)."""
    return ResNetV2(Bottleneck, (3, 4, 6, 3), num_classes, input_shape, zero_init_residual)


@register_model("ResNet18")
def resnet18_cifar(num_classes, input_shape, zero_init_residual=False):
    """CIFAR ResNet-18: BasicBlock stages [2, 2, 2, 2] (mdistiller `ResNet18`)."""
    return ResNetV2(BasicBlock, (2, 2, 2, 2), num_classes, input_shape, zero_init_residual)


@register_model("ResNet34")
def resnet34_cifar(num_classes, input_shape, zero_init_residual=False):
    """CIFAR ResNet-34: BasicBlock stages [3, 4, 6, 3] (the DAFL/DFAD/DeepInversion CIFAR teacher)."""
    return ResNetV2(BasicBlock, (3, 4, 6, 3), num_classes, input_shape, zero_init_residual)
