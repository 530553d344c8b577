"""ShuffleNetV2 of the KD benchmarks (RepDistiller/mdistiller `ShuffleNetv2.py`, `ShuffleV2`: net_size 1).

Stem conv1x1 (3 -> 24) + BN + ReLU at 32 px; stages of out 116/232/464, each one stride-2 DownBlock then 3/7/3
BasicBlocks (split ratio 0.5, channel shuffle with 2 groups); conv1x1 (464 -> 1024) + BN + ReLU, average pool,
Linear(1024 -> classes). Default PyTorch init, as in the reference. Module names match the reference (conv1, bn1,
layerN.i.{conv,bn}K, conv2, bn2, linear), so the benchmarks' checkpoints load as they are.

Taps: stem, stage1..3 (the last unit's output, after its channel shuffle), stage1_pre..stage3_pre (the last unit's
concatenation [x1, pre-ReLU branch] before the shuffle), embedding (pooled 1024 after conv2-BN-ReLU), logits.
bn_before_relu() is not implemented (the reference raises for ShuffleNets too).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models.base import TapModel
from kdbench.models.registry import register_model

CONFIGS = {
    0.5: {"out_channels": (48, 96, 192, 1024), "num_blocks": (3, 7, 3)},
    1: {"out_channels": (116, 232, 464, 1024), "num_blocks": (3, 7, 3)},
    1.5: {"out_channels": (176, 352, 704, 1024), "num_blocks": (3, 7, 3)},
    2: {"out_channels": (224, 488, 976, 2048), "num_blocks": (3, 7, 3)},
}


class ShuffleBlock(nn.Module):
    def __init__(self, groups: int = 2):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        g = self.groups
        return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class SplitBlock(nn.Module):
    def __init__(self, ratio: float):
        super().__init__()
        self.ratio = ratio

    def forward(self, x):
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class BasicBlock(nn.Module):
    """Returns (output after shuffle, preact = [x1, pre-ReLU branch] before the shuffle)."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split = SplitBlock(split_ratio)
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock()

    def forward(self, x):
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre = self.bn3(self.conv3(out))
        out = self.shuffle(torch.cat([x1, F.relu(pre)], 1))
        return out, torch.cat([x1, pre], 1)


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock()

    def forward(self, x):
        out1 = self.bn1(self.conv1(x))
        out1 = F.relu(self.bn2(self.conv2(out1)))
        out2 = F.relu(self.bn3(self.conv3(x)))
        out2 = self.bn4(self.conv4(out2))
        out2 = F.relu(self.bn5(self.conv5(out2)))
        return self.shuffle(torch.cat([out1, out2], 1))


class ShuffleNetV2(TapModel):
    stage_names = ("stage1", "stage2", "stage3")
    tap_names = ("stem", "stage1", "stage2", "stage3", "stage1_pre", "stage2_pre", "stage3_pre", "embedding", "logits")

    def __init__(self, net_size: float, num_classes: int, input_shape: Sequence[int]):
        super().__init__()
        out_channels = CONFIGS[net_size]["out_channels"]
        num_blocks = CONFIGS[net_size]["num_blocks"]
        self.conv1 = nn.Conv2d(input_shape[0], 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        for i, (c, n) in enumerate(zip(out_channels[:3], num_blocks), start=1):
            setattr(self, f"layer{i}", nn.Sequential(DownBlock(in_channels, c), *[BasicBlock(c) for _ in range(n)]))
            in_channels = c
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = the reference's avg_pool2d(4) on 32x32 inputs
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _forward_taps(self, x, taps):
        x = F.relu(self.bn1(self.conv1(x)))
        out = {"stem": x}
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3), start=1):
            x = layer[0](x)
            for block in layer[1:]:
                x, pre = block(x)
            out[f"stage{i}_pre"] = pre
            out[f"stage{i}"] = x
        x = F.relu(self.bn2(self.conv2(x)))
        out["embedding"] = self.avgpool(x).flatten(1)
        out["logits"] = self.linear(out["embedding"])
        return out


@register_model("ShuffleV2")
def shufflev2(num_classes, input_shape, net_size=1):
    """ShuffleNetV2 net_size 1: out 116/232/464, 3/7/3 units, conv to 1024 (RepDistiller/mdistiller `ShuffleV2`)."""
    return ShuffleNetV2(net_size, num_classes, input_shape)
