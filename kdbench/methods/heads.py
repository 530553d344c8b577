"""Helpers for the methods that reuse a network's classifier or the map it pools (SimKD, SRRL, CAT-KD):
which Linear reads the pooled `embedding`, and which tap is the map that the network average-pools into it.
Not a method (nothing registers here).

  - linear_head(model, dim, classes)     the last nn.Linear(dim -> classes) of the model (its classifier), or None
  - pooled_map(pair, side, method)       (tap, relu) such that GAP(relu?(tap)) == embedding, found by probing the
                                         model once in eval mode: the last stage for the CIFAR ResNets, VGG,
                                         ShuffleV1 and ResNet50; relu(stage3_pre) for the pre-activation WRNs
                                         (their classifier pools relu(bn1(stage3))). MobileNetV2 and ShuffleV2 have
                                         a 1x1 conv between their last stage and the pool, so no tap is that map
                                         (IncompatibleModels).
  - frozen_head(linear)                  (weight, bias) copies, detached, for a method's buffers
  - apply_head(x, weight, bias)          x @ W^T + b
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import PairInfo


def linear_head(model: nn.Module, dim: int, num_classes: int) -> Optional[nn.Linear]:
    """The last Linear(dim -> num_classes) among the model's modules (the classifier on the embedding), else None."""
    found = None
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.in_features == dim and m.out_features == num_classes:
            found = m
    return found


def classifier_of(pair: PairInfo, side: str, method: str) -> nn.Linear:
    """The side's classifier on its `embedding`, or IncompatibleModels."""
    model, shapes, name = _side(pair, side, method)
    dim = _embedding_dim(pair, side, method)
    head = linear_head(model, dim, pair.num_classes)
    if head is None:
        raise pair.incompatible(method, f"it needs the {side}'s linear classifier on its {dim}-d embedding, "
                                        f"and {name} has no Linear({dim} -> {pair.num_classes})")
    return head


def frozen_head(head: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached copies of (weight, bias) (a zero bias when the Linear has none)."""
    weight = head.weight.detach().clone()
    bias = head.bias.detach().clone() if head.bias is not None else torch.zeros(head.out_features, dtype=weight.dtype)
    return weight, bias


def apply_head(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def pooled_map(pair: PairInfo, side: str, method: str) -> tuple[str, bool]:
    """(tap, relu): the side's feature map whose global average pool is its `embedding`, as relu(tap) when relu.

    Candidates in order: the last stage tap; relu of the last stage's `_pre` tap. Each is checked on one eval-mode
    forward of a fixed random input (shapes first, then values), so the answer follows what the model computes
    rather than its name. IncompatibleModels when neither is (MobileNetV2, ShuffleV2, MLPs)."""
    model, shapes, name = _side(pair, side, method)
    dim = _embedding_dim(pair, side, method)
    stages = tuple(getattr(model, "stage_names", ()))
    if not stages:
        raise pair.incompatible(method, f"it needs the {side}'s last feature map, and {name} has no stages")
    last = stages[-1]
    candidates = [(last, False)]
    if f"{last}_pre" in model.tap_names:
        candidates.append((f"{last}_pre", True))
    candidates = [(t, r) for t, r in candidates if len(shapes.get(t, ())) == 3 and shapes[t][0] == dim]
    if candidates and len(pair.input_shape) == 3:
        out = _probe(model, pair.input_shape, [t for t, _ in candidates])
        emb = out["embedding"].double()
        for tap, relu in candidates:
            f = out[tap].double()
            pooled = (F.relu(f) if relu else f).mean((2, 3))
            if torch.allclose(pooled, emb, rtol=1e-4, atol=1e-5):
                return tap, relu
    elif candidates:  # no input shape to probe with: trust the shapes
        return candidates[0]
    have = ", ".join(f"{t} {'x'.join(map(str, shapes[t]))}" for t in (last, f"{last}_pre") if t in shapes)
    raise pair.incompatible(method, f"it needs the feature map the {side}'s classifier average-pools into its "
                                    f"{dim}-d embedding, and no tap of {name} is that map ({have}; a layer between "
                                    f"the last stage and the pool has no tap)")


def _side(pair: PairInfo, side: str, method: str):
    if side == "student":
        return pair.student, pair.student_shapes, pair.student_name
    if pair.teacher is None or pair.teacher_shapes is None:
        raise pair.incompatible(method, "it needs a teacher")
    return pair.teacher, pair.teacher_shapes, pair.teacher_name


def _embedding_dim(pair: PairInfo, side: str, method: str) -> int:
    model, shapes, name = _side(pair, side, method)
    shape = shapes.get("embedding")
    if shape is None or len(shape) != 1:
        raise pair.incompatible(method, f"it needs the {side}'s pooled embedding vector, and {name} has "
                                        f"{'none' if shape is None else 'x'.join(map(str, shape))}")
    return int(shape[0])


@torch.no_grad()
def _probe(model: nn.Module, input_shape, taps) -> dict[str, torch.Tensor]:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    was = model.training
    model.eval()
    try:
        return model.forward_taps(x, tuple(taps))
    finally:
        model.train(was)
