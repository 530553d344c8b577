"""LeNet-5 (LeCun et al. 1998) as used by the data-free KD papers (DAFL): C1-S2-C3-S4-C5-F6-output, ReLU, max-pool.

The classic net expects 32x32 inputs; 28x28 MNIST is zero-padded by 2 in C1 (the data-free papers resize
to 32x32 instead; the feature shapes are the same). lenet5_half halves every width (the DAFL student).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kdbench.models.base import TapModel
from kdbench.models.registry import register_model


class LeNet5(TapModel):
    stage_names = ("stage1", "stage2")
    tap_names = ("stage1", "stage2", "stage3", "embedding", "logits")

    def __init__(self, num_classes: int, input_shape: Sequence[int], widths: Sequence[int] = (6, 16, 120, 84)):
        super().__init__()
        c, h, _ = input_shape
        c1, c3, c5, f6 = widths
        self.conv1 = nn.Conv2d(c, c1, 5, padding=(32 - h) // 2 if h < 32 else 0)
        self.conv3 = nn.Conv2d(c1, c3, 5)
        self.conv5 = nn.Conv2d(c3, c5, 5)
        self.fc6 = nn.Linear(c5, f6)
        self.fc7 = nn.Linear(f6, num_classes)
        self.pool = nn.MaxPool2d(2)

    def _forward_taps(self, x, taps):
        s1 = self.pool(torch.relu(self.conv1(x)))
        s2 = self.pool(torch.relu(self.conv3(s1)))
        s3 = torch.relu(self.conv5(s2))
        emb = torch.relu(self.fc6(s3.flatten(1)))
        return {"stage1": s1, "stage2": s2, "stage3": s3, "embedding": emb, "logits": self.fc7(emb)}


@register_model("lenet5")
def lenet5(num_classes, input_shape):
    """LeNet-5: conv 6 - pool - conv 16 - pool - conv 120 - fc 84 - classifier (ReLU)."""
    return LeNet5(num_classes, input_shape)


@register_model("lenet5_half")
def lenet5_half(num_classes, input_shape):
    """LeNet-5 at about half width: conv 3 - pool - conv 8 - pool - conv 60 - fc 42 - classifier."""
    return LeNet5(num_classes, input_shape, widths=(3, 8, 60, 42))
