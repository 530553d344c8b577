"""The uniform feature API: every model returns logits from forward() and named features from forward_taps().

Tap names are shared across families so methods can ask for them without knowing the architecture:
  stem            output of the input stem
  stage1..stageK  stage outputs (post-activation, as the reference code returns them)
  stageN_pre      the same stage output before its final ReLU (where the architecture defines one)
  hidden1..       hidden layers of an MLP
  embedding       the pooled / penultimate vector fed to the classifier
  logits          the classifier output (always returned)
"""
from __future__ import annotations

from typing import Collection

import math

import torch
from torch import nn

from kdbench.errors import UnknownName


class TapModel(nn.Module):
    #: every tap this model can return, in depth order
    tap_names: tuple[str, ...] = ("logits",)
    #: the ordered stage taps methods iterate over (e.g. AT over every stage)
    stage_names: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_taps(x, frozenset())["logits"]

    def forward_taps(self, x: torch.Tensor, taps: Collection[str] = ()) -> dict[str, torch.Tensor]:
        """Logits plus the requested taps (a model may return more; callers index by name)."""
        wanted = frozenset(taps)
        unknown = wanted.difference(self.tap_names)
        if unknown:
            raise UnknownName(
                f"{type(self).__name__} has no tap {sorted(unknown)}; it has: {', '.join(self.tap_names)}"
            )
        return self._forward_taps(x, wanted)

    def _forward_taps(self, x: torch.Tensor, taps: frozenset[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The BatchNorm before each stage's final ReLU, aligned with stage_names (OFD margins)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose BN-before-ReLU modules")


@torch.no_grad()
def probe_taps(model: TapModel, input_shape: Collection[int], taps: Collection[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes (without batch dim) of the given taps (default: all), from one eval-mode forward of zeros."""
    names = model.tap_names if taps is None else tuple(taps)
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        out = model.forward_taps(torch.zeros(2, *input_shape, device=device), names)
    finally:
        model.train(was_training)
    return {name: tuple(out[name].shape[1:]) for name in names}


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def init_conv_fan_out_linear_small(model: nn.Module) -> None:
    """The VGG/MobileNetV2 reference init: conv N(0, sqrt(2 / (k*k*C_out))), BN 1/0, Linear N(0, 0.01), biases 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
