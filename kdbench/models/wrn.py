"""Wide ResNets of the KD benchmarks (RepDistiller/mdistiller `wrn.py`): pre-activation blocks, depth 6n+4.

Module names match the reference definitions (conv1, blockN.layer.i.{bn1,conv1,bn2,conv2,convShortcut}, bn1,
fc), so the benchmarks' teacher checkpoints load as they are.

Taps (reference `feat` list, methods.md §3.3):
  stem        the stem conv output (no BN/ReLU: the network is pre-activation)
  stage1..3   the raw residual-stream output of block1..3 (no BN/ReLU applied)
  stage1_pre  block2.layer[0].bn1(stage1)   } the BN that precedes the next ReLU, applied to the stage output,
  stage2_pre  block3.layer[0].bn1(stage2)   } no ReLU (RepDistiller's preact=True)
  stage3_pre  bn1(stage3)                   }
  embedding   avg-pooled output of the final BN-ReLU
  logits

As in RepDistiller, a `_pre` tap calls its BN a second time on the stage output; in training mode that call also
updates the BN's running statistics once more, so a `_pre` tap is computed only when it is requested (RepDistiller
does the extra calls only when preact=True; mdistiller does them on every forward, methods.md §2.19 item 6).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from torch import nn

from kdbench.models.base import TapModel
from kdbench.models.registry import register_model


class BasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut; a 1x1 conv shortcut (fed the pre-activated input) if in != out."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        # relu1 acts in place on bn1's fresh output, never on x (which may be a tap)
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return (x if self.equal_in_out else self.convShortcut(act)) + out


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(nb_layers)
        ])

    def forward(self, x):
        return self.layer(x)


class WideResNet(TapModel):
    stage_names = ("stage1", "stage2", "stage3")
    tap_names = ("stem", "stage1", "stage2", "stage3", "stage1_pre", "stage2_pre", "stage3_pre", "embedding", "logits")

    def __init__(self, depth: int, widen_factor: int, num_classes: int, input_shape: Sequence[int],
                 drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(input_shape[0], channels[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = the reference's avg_pool2d(8) on 32x32 inputs
        self.fc = nn.Linear(channels[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def _forward_taps(self, x, taps):
        stem = self.conv1(x)
        f1 = self.block1(stem)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        emb = self.avgpool(self.relu(self.bn1(f3))).flatten(1)
        out = {"stem": stem, "stage1": f1, "stage2": f2, "stage3": f3, "embedding": emb, "logits": self.fc(emb)}
        if "stage1_pre" in taps:
            out["stage1_pre"] = self.block2.layer[0].bn1(f1)
        if "stage2_pre" in taps:
            out["stage2_pre"] = self.block3.layer[0].bn1(f2)
        if "stage3_pre" in taps:
            out["stage3_pre"] = self.bn1(f3)  # the reference's second call (see the module docstring)
        return out

    def bn_before_relu(self):
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]


def _register(name: str, depth: int, widen_factor: int) -> None:
    def factory(num_classes, input_shape, drop_rate=0.0):
        return WideResNet(depth, widen_factor, num_classes, input_shape, drop_rate)

    factory.__doc__ = f"WRN-{depth}-{widen_factor} (pre-activation, dropout 0 as in the benchmarks)"
    register_model(name)(factory)


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(f"wrn_{_depth}_{_k}", _depth, _k)
