"""Fully connected nets: Hinton et al. 2015's MNIST teacher (784-1200-1200-10) and student (784-800-800-10)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kdbench.models.base import TapModel
from kdbench.models.registry import register_model


class MLP(TapModel):
    """ReLU MLP over the flattened input; dropout on the input and after each hidden layer."""

    def __init__(self, num_classes: int, input_shape: Sequence[int], hidden: Sequence[int] = (1200, 1200),
                 dropout: float = 0.0, input_dropout: float = 0.0):
        super().__init__()
        in_features = 1
        for d in input_shape:
            in_features *= d
        widths = [in_features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.input_dropout = nn.Dropout(input_dropout)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.stage_names = tuple(f"hidden{i + 1}" for i in range(len(hidden)))
        self.tap_names = (*self.stage_names, "embedding", "logits")

    def _forward_taps(self, x, taps):
        out = {}
        h = self.input_dropout(x.flatten(1))
        for name, layer in zip(self.stage_names, self.hidden):
            h = torch.relu(layer(h))
            out[name] = h
            h = self.dropout(h)
        out["embedding"] = h
        out["logits"] = self.fc(h)
        return out


@register_model("mlp")
def mlp(num_classes, input_shape, hidden=(1200, 1200), dropout=0.0, input_dropout=0.0):
    """Multilayer perceptron on the flattened input: `hidden` ReLU layers, optional (input) dropout."""
    return MLP(num_classes, input_shape, hidden, dropout, input_dropout)


@register_model("mlp_1200x2")
def mlp_1200x2(num_classes, input_shape, dropout=0.5, input_dropout=0.2):
    """Hinton 2015 teacher: two hidden layers of 1200 ReLUs, dropout (0.2 on inputs, 0.5 on hiddens)."""
    return MLP(num_classes, input_shape, (1200, 1200), dropout, input_dropout)


@register_model("mlp_800x2")
def mlp_800x2(num_classes, input_shape, dropout=0.0, input_dropout=0.0):
    """Hinton 2015 student: two hidden layers of 800 ReLUs, no regularisation."""
    return MLP(num_classes, input_shape, (800, 800), dropout, input_dropout)


@register_model("mlp_32")
def mlp_32(num_classes, input_shape, hidden=(32,), dropout=0.0, input_dropout=0.0):
    """Small digits/MNIST student: one hidden layer of 32 ReLUs."""
    return MLP(num_classes, input_shape, hidden, dropout, input_dropout)
