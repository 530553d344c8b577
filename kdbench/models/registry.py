"""Model registry: list_models() / create_model(name, num_classes=..., input_shape=..., **kwargs)."""
from __future__ import annotations

from typing import Callable, Sequence

from kdbench.models.base import TapModel
from kdbench.registry import Registry

MODELS: Registry[Callable[..., TapModel]] = Registry("model")
register_model = MODELS.register


def list_models() -> list[str]:
    return MODELS.names()


def create_model(name: str, num_classes: int, input_shape: Sequence[int], **kwargs) -> TapModel:
    """Build a registered model for `num_classes` outputs and inputs of shape (C, H, W)."""
    return MODELS.get(name)(num_classes=num_classes, input_shape=tuple(input_shape), **kwargs)
