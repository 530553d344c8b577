"""MobileNetV2 of the KD benchmarks (RepDistiller/mdistiller `mobilenetv2.py`; `MobileNetV2` = their `mobile_half`).

Expansion T = 6, width multiplier 0.5: stem conv3x3 stride 2 (3 -> 16) + BN + ReLU, seven inverted-residual
groups (t, c, n, s) = (1,16,1,1) (T,24,2,1) (T,32,3,2) (T,64,4,2) (T,96,3,1) (T,160,3,2) (T,320,1,1) with c scaled by
the width, linear bottlenecks, conv1x1 -> 1280 + BN + ReLU, average pool, Linear. Module names match the reference
(conv1.{0,1}, blocks.g.i.conv.{0..7}, conv2.{0,1}, classifier.0), so the benchmarks' checkpoints load as they are.
Unlike the reference, the constructor prints nothing.

Taps: stem (16x16 after the stem ReLU), stage1..4 = the outputs of blocks[1], blocks[2], blocks[4], blocks[6]
(linear-bottleneck BN outputs, no ReLU), embedding (pooled 1280), logits. There are no `_pre` taps: the reference
defines no preact for this network (mdistiller has no `preact_feats` for it).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from kdbench.models.base import TapModel, init_conv_fan_out_linear_small
from kdbench.models.registry import register_model


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        assert stride in (1, 2)
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),  # pointwise expansion
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # depthwise
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),  # pointwise linear
            nn.BatchNorm2d(oup),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(TapModel):
    stage_names = ("stage1", "stage2", "stage3", "stage4")
    tap_names = ("stem", "stage1", "stage2", "stage3", "stage4", "embedding", "logits")
    #: index of the block group whose output is each stage tap
    _stage_blocks = {1: "stage1", 2: "stage2", 4: "stage3", 6: "stage4"}

    def __init__(self, num_classes: int, input_shape: Sequence[int], expansion: int = 6, width_mult: float = 0.5):
        super().__init__()
        settings = [(1, 16, 1, 1), (expansion, 24, 2, 1), (expansion, 32, 3, 2), (expansion, 64, 4, 2),
                    (expansion, 96, 3, 1), (expansion, 160, 3, 2), (expansion, 320, 1, 1)]
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(input_shape[0], input_channel, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in settings:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_1x1_bn(input_channel, self.last_channel)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        size = input_shape[1]
        # the reference: AvgPool2d(input_size // 16, ceil_mode=True) (asserts input_size % 32 == 0)
        self.avgpool = nn.AvgPool2d(size // 16, ceil_mode=True) if size % 32 == 0 else nn.AdaptiveAvgPool2d(1)
        init_conv_fan_out_linear_small(self)

    def _forward_taps(self, x, taps):
        x = self.conv1(x)
        out = {"stem": x}
        for i, group in enumerate(self.blocks):
            x = group(x)
            if i in self._stage_blocks:
                out[self._stage_blocks[i]] = x
        out["embedding"] = self.avgpool(self.conv2(x)).flatten(1)
        out["logits"] = self.classifier(out["embedding"])
        return out

    def bn_before_relu(self):
        return [self.blocks[i][-1].conv[-1] for i in self._stage_blocks]


@register_model("MobileNetV2")
def mobilenetv2_half(num_classes, input_shape, expansion=6, width_mult=0.5):
    """RepDistiller/mdistiller `mobile_half`: MobileNetV2 with T = 6 and width 0.5."""
    return MobileNetV2(num_classes, input_shape, expansion, width_mult)
