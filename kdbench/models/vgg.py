"""VGG with BatchNorm as in the KD benchmarks (RepDistiller/mdistiller `vgg.py`; vgg8 is their 'S' config).

Five conv blocks (each conv 3x3 pad 1 with bias, then BN, ReLU; the last ReLU of each block is applied outside
the block, so blockN's output is pre-ReLU), max-pool 2x2 after blocks 0, 1, 2 (and after block 3 only for 64-px
inputs), adaptive average pool, one Linear(512 -> classes). Module names match the reference (block0..4 as
Sequentials of conv/BN/ReLU, classifier), so the benchmarks' teacher checkpoints load as they are.

Taps: stem (block0 after ReLU), stage1..4 (blocks 1-4 after ReLU), stage1_pre..stage4_pre (the block's last BN
output, before that ReLU), embedding (pooled 512), logits.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import nn

from kdbench.models.base import TapModel, init_conv_fan_out_linear_small
from kdbench.models.registry import register_model

CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
    # NetGraft's student (zju-vipa/NetGraft network/vgg_block.py 'vgg16-graft'): vgg16 with blocks 3 and 4 at 256
    "vgg16_graft": [[64, 64], [128, 128], [256, 256, 256], [256, 256, 256], [256, 256, 256]],
}


def _make_block(widths: Sequence[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in widths:
        layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        in_channels = v
    return nn.Sequential(*layers[:-1])  # the block's last ReLU is applied in forward


class VGG(TapModel):
    stage_names = ("stage1", "stage2", "stage3", "stage4")
    tap_names = ("stem", "stage1", "stage2", "stage3", "stage4",
                 "stage1_pre", "stage2_pre", "stage3_pre", "stage4_pre", "embedding", "logits")

    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int, input_shape: Sequence[int]):
        super().__init__()
        in_channels = input_shape[0]
        for i, widths in enumerate(cfg):
            setattr(self, f"block{i}", _make_block(widths, in_channels))
            in_channels = widths[-1]
        self.pool0 = nn.MaxPool2d(2, 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.pool3 = nn.MaxPool2d(2, 2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        init_conv_fan_out_linear_small(self)

    def _forward_taps(self, x, taps):
        h = x.shape[2]
        x = F.relu(self.block0(x))
        out = {"stem": x}
        x = self.pool0(x)
        for i, (block, pool) in enumerate(((self.block1, self.pool1), (self.block2, self.pool2),
                                           (self.block3, self.pool3), (self.block4, None)), start=1):
            pre = block(x)
            x = F.relu(pre)
            out[f"stage{i}_pre"] = pre
            out[f"stage{i}"] = x
            if pool is not None and (i < 3 or h == 64):
                x = pool(x)
        out["embedding"] = self.pool4(x).flatten(1)
        out["logits"] = self.classifier(out["embedding"])
        return out

    def bn_before_relu(self):
        return [self.block1[-1], self.block2[-1], self.block3[-1], self.block4[-1]]


def _register(name: str) -> None:
    def factory(num_classes, input_shape):
        return VGG(CONFIGS[name], num_classes, input_shape)

    factory.__doc__ = f"{name} with BN (conv widths per block {CONFIGS[name]}), single-Linear head"
    register_model(name)(factory)


for _name in CONFIGS:
    _register(_name)
