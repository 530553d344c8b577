"""MobileNet-V1 (Howard et al. 2017) as the ImageNet KD papers use it (CRD, ReviewKD, DKD: ResNet-50 -> MobileNet-V1;
mdistiller's mdistiller/models/imagenet/mobilenetv1.py): width 1.0, a 3x3 stride-2 conv-BN-ReLU stem of 32 channels,
13 depthwise-separable blocks (3x3 depthwise conv-BN-ReLU, 1x1 pointwise conv-BN-ReLU), global average pooling, one
Linear. Module names follow the reference (`model.<i>`, `fc`), so its checkpoints load as they are.

Taps (224x224 inputs): stem (32 x 112 x 112), stage1..4 = the outputs of blocks 3, 5, 11 and 13 (128 x 56 x 56,
256 x 28 x 28, 512 x 14 x 14, 1024 x 7 x 7: the last block of each resolution, as the reference's feats), stageN_pre
= the same before their final ReLU (the reference's preact_feats), embedding (pooled 1024), logits. bn_before_relu():
those blocks' last BatchNorm. 4,231,976 parameters with 1000 classes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models.base import TapModel
from kdbench.models.registry import register_model

# (in, out, stride) of the depthwise-separable blocks
_BLOCKS = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2), (512, 512, 1),
           (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 1024, 2), (1024, 1024, 1)]
_STAGE_END = {3: "stage1", 5: "stage2", 11: "stage3", 13: "stage4"}  # index in self.model of each stage's last block


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
                         nn.ReLU(inplace=True), nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU(inplace=True))


class MobileNetV1(TapModel):
    stage_names = ("stage1", "stage2", "stage3", "stage4")
    tap_names = ("stem", "stage1_pre", "stage1", "stage2_pre", "stage2", "stage3_pre", "stage3", "stage4_pre", "stage4",
                 "embedding", "logits")

    def __init__(self, num_classes: int, input_shape: Sequence[int]):
        super().__init__()
        if input_shape[0] != 3:
            raise ValueError(f"mobilenet_v1 expects 3-channel inputs, got input_shape {tuple(input_shape)}")
        self.model = nn.Sequential(_conv_bn(3, 32, 2), *(_conv_dw(i, o, s) for i, o, s in _BLOCKS))
        self.fc = nn.Linear(1024, num_classes)

    def bn_before_relu(self):
        return [self.model[i][-2] for i in _STAGE_END]

    def _forward_taps(self, x, taps):
        out = {}
        for i, block in enumerate(self.model):
            if i in _STAGE_END:
                pre = block[:-1](x)  # every layer of the block but its final ReLU
                name = _STAGE_END[i]
                out[f"{name}_pre"], x = pre, F.relu(pre)
                out[name] = x
            else:
                x = block(x)
                if i == 0:
                    out["stem"] = x
        out["embedding"] = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # the reference's AvgPool2d(7) at 224x224
        out["logits"] = self.fc(out["embedding"])
        return out


@register_model("mobilenet_v1")
def mobilenet_v1(num_classes, input_shape):
    """MobileNet-V1 1.0 as the ImageNet KD papers define it (mdistiller's), 4.2M parameters."""
    return MobileNetV1(num_classes, input_shape)
