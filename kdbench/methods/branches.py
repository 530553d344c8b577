"""Building blocks of the online methods that train several networks together (ONE, OKDDip, FFL, KTG, Rocket
Launching): extra networks built from model configs, a network's last stage split off as a branch, the soft-target
KL their reference codes share, and their sigmoid ramp-up. Not a method (nothing registers here).

  - soft_target_kl(z, target, T)   T^2 * mean_i sum_c q_ic (log q_ic - log p_ic) with q = softmax(target / T) + 1e-7
                                   (not renormalised) and p = softmax(z / T): the KLLoss of ONE_NeurIPS2018
                                   loss/kl_loss.py, FFL-pytorch utils.py and OKDDip utils.py (KL_Loss)
  - sigmoid_rampup(e, L)           exp(-5 (1 - min(e, L) / L)^2), e counted from 0 (ONE utils/ramps.py, the same
                                   function in FFL-pytorch utils.py and OKDDip train_GL.py); 1 when L = 0
  - model_spec(entry)              a model name or a model config mapping {name: ..., **kwargs} -> (name, kwargs)
  - branch_split(model)            where a network's last stage begins (the tap it reads) and ends, for the families
                                   whose last stage can be cut off: CIFAR ResNets, WRNs, VGGs, ResNet18/50
  - BranchTail                     a network's last stage + pooling + classifier as a module: branch tap -> (last
                                   stage output, pooled embedding, logits), the outputs the full network's taps give
  - make_tails(...)                fresh tails for the extra branches (each cut from a freshly built model, so each
                                   branch starts from its own random initialisation)
  - DecayAdjust                    an autograd identity whose backward adds delta * w to w's gradient (a module whose
                                   reference optimizer uses another weight decay than the run's: FFL's fusion module)
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import PairInfo
from kdbench.errors import KDBenchError
from kdbench.models import create_model
from kdbench.models.base import TapModel
from kdbench.models.resnet_cifar import CifarResNet
from kdbench.models.resnetv2 import ResNetV2
from kdbench.models.vgg import VGG
from kdbench.models.wrn import WideResNet

SOFT_TARGET_EPS = 1e-7  # the reference codes add 1e-7 to the target probabilities (ONE, FFL, OKDDip)


def soft_target_kl(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float,
                   eps: float = SOFT_TARGET_EPS, detach_target: bool = True) -> torch.Tensor:
    """T^2 * (1/B) * sum_i sum_c q_ic (log q_ic - log p_ic), p = softmax(logits / T), q = softmax(target / T) + eps.

    The reference codes' KLLoss (ONE_NeurIPS2018 loss/kl_loss.py, FFL-pytorch utils.KLLoss: target taken as `.data`;
    OKDDip utils.KL_Loss: the same value through nn.KLDivLoss(batchmean), but without detaching the target). eps is
    added after the softmax and q is not renormalised, as there. detach_target=False lets the gradient reach the
    target's logits (OKDDip's code)."""
    target = target_logits.detach() if detach_target else target_logits
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    q = F.softmax(target.float() / temperature, dim=1) + eps
    return temperature ** 2 * (q * (q.log() - log_p)).sum(1).mean()


def sigmoid_rampup(epoch0: float, length: float) -> float:
    """exp(-5 (1 - t)^2) with t = clip(epoch0, 0, length) / length (Laine & Aila's ramp-up as the ONE, FFL and
    OKDDip codes compute it, epoch0 counted from 0 = their first epoch); 1 when length is 0 (no ramp-up)."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(float(epoch0), 0.0), float(length)) / float(length)
    return float(math.exp(-5.0 * phase * phase))


def model_spec(entry, method: str) -> tuple[str, dict]:
    """A model given as a name or as a model config mapping {name: ..., <kwargs>} (e.g. ${student.model})."""
    if isinstance(entry, dict):
        kwargs = dict(entry)
        if "name" not in kwargs:
            raise KDBenchError(f"{method}: a model given as a mapping needs a 'name' key, got {kwargs}")
        return str(kwargs.pop("name")), kwargs
    if isinstance(entry, str) and entry:
        return entry, {}
    raise KDBenchError(f"{method}: a model must be a model name or a model config, got {entry!r}")


def build_model(entry, pair: PairInfo, method: str) -> tuple[str, TapModel]:
    """(name, a freshly built model of `entry` for the pair's classes and inputs)."""
    if not pair.input_shape:
        raise KDBenchError(f"{method} builds extra networks from PairInfo.input_shape, which is empty")
    name, kwargs = model_spec(entry, method)
    return name, create_model(name, num_classes=pair.num_classes, input_shape=pair.input_shape, **kwargs)


# ----------------------------------------------------------------------------- a network's last stage as a branch


class BranchTail(nn.Module):
    """The last stage of a network, its pooling and its classifier, fed the tap before that stage.

    forward(x) -> (last stage output as the network's own last-stage tap gives it, pooled embedding, logits):
      CIFAR ResNet  x = stage2 (post-ReLU) -> layer3 (a ReLU after each block) -> avgpool -> fc
      WRN           x = stage2 (residual stream) -> block3 -> relu(bn1) -> avgpool -> fc; the last-stage output
                    returned is block3's raw output (the WRN's stage3 tap)
      VGG           x = stage3 (post-ReLU) -> [pool3 on 64-px inputs] -> block4 -> ReLU -> pool4 -> classifier
      ResNet18/50   x = stage3 (post-ReLU) -> layer4 (a ReLU after each block) -> avgpool -> linear
    """

    def __init__(self, family: str, modules: dict[str, nn.Module], pool_first: bool = False):
        super().__init__()
        self.family = family
        self.pool_first = pool_first
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.family in ("resnet", "resnetv2"):
            for block in self.stage:
                x = F.relu(block(x))
            feature = x
            emb = self.pool(x).flatten(1)
        elif self.family == "wrn":
            feature = self.stage(x)
            emb = self.pool(F.relu(self.bn(feature))).flatten(1)
        elif self.family == "vgg":
            if self.pool_first:
                x = self.pre_pool(x)
            feature = F.relu(self.stage(x))
            emb = self.pool(feature).flatten(1)
        else:  # pragma: no cover - families are fixed by branch_split
            raise KDBenchError(f"unknown branch family {self.family}")
        return feature, emb, self.head(emb)


def branch_split(model: TapModel) -> Optional[tuple[str, str, str]]:
    """(family, tap the last stage reads, the last stage's own tap) for the networks whose last stage can be cut off
    as a branch; None for the others (MobileNetV2, ShuffleNets, MLPs, ...)."""
    if isinstance(model, CifarResNet):
        return "resnet", "stage2", "stage3"
    if isinstance(model, WideResNet):
        return "wrn", "stage2", "stage3"
    if isinstance(model, VGG):
        return "vgg", "stage3", "stage4"
    if isinstance(model, ResNetV2):
        return "resnetv2", "stage3", "stage4"
    return None


def cut_tail(model: TapModel, input_shape: Sequence[int]) -> BranchTail:
    """The last stage + pooling + classifier of `model` (its own modules, not copies) as a BranchTail."""
    split = branch_split(model)
    if split is None:
        raise KDBenchError(f"{type(model).__name__} has no last stage that can be cut off as a branch")
    family = split[0]
    if family == "resnet":
        return BranchTail(family, {"stage": model.layer3, "pool": model.avgpool, "head": model.fc})
    if family == "resnetv2":
        return BranchTail(family, {"stage": model.layer4, "pool": model.avgpool, "head": model.linear})
    if family == "wrn":
        return BranchTail(family, {"stage": model.block3, "bn": model.bn1, "pool": model.avgpool, "head": model.fc})
    return BranchTail(family, {"pre_pool": model.pool3, "stage": model.block4, "pool": model.pool4,
                               "head": model.classifier}, pool_first=int(input_shape[-2]) == 64)


def require_split(pair: PairInfo, method: str) -> tuple[str, str, str]:
    """The student's branch split, or IncompatibleModels naming the families that have one."""
    split = branch_split(pair.student)
    if split is None:
        raise pair.incompatible(method, f"its branches are copies of the student's last stage, and a "
                                        f"{type(pair.student).__name__} has none that can be cut off (supported: CIFAR "
                                        f"ResNets, WRNs, VGGs, ResNet18/50)")
    return split


def make_tails(entry, count: int, pair: PairInfo, method: str) -> list[BranchTail]:
    """`count` fresh branch tails of model `entry` (the student's architecture: ${student.model}), each cut from a
    model built anew, so each starts from its own random initialisation; the rest of those models is dropped."""
    family, tap, last = require_split(pair, method)
    tails = []
    for _ in range(count):
        name, model = build_model(entry, pair, method)
        if type(model) is not type(pair.student) or branch_split(model)[0] != family:
            raise pair.incompatible(method, f"its branch model {name} is not of the student's architecture "
                                            f"({type(pair.student).__name__})")
        tail = cut_tail(model, pair.input_shape)
        was = tail.training
        tail.eval()
        try:  # the branch must read the student's tap and give the student's last-stage shape
            with torch.no_grad():
                shape = tuple(tail(torch.zeros(2, *pair.student_shapes[tap]))[0].shape[1:])
        except RuntimeError:
            shape = None
        tail.train(was)
        if shape != tuple(pair.student_shapes[last]):
            got = f"gives {last} of shape {shape}" if shape else f"cannot read the student's {tap} " \
                                                                 f"{tuple(pair.student_shapes[tap])}"
            raise pair.incompatible(method, f"its branch model {name} {got} (the student's {last}: "
                                            f"{tuple(pair.student_shapes[last])}); use the student's model config "
                                            f"(${{student.model}})")
        tails.append(tail)
    return tails


# ----------------------------------------------------------------------------- a per-module weight decay


class DecayAdjust(torch.autograd.Function):
    """Identity in the forward; the backward adds delta * w to w's gradient.

    The run's optimizer applies its weight decay wd to every parameter (grad + wd * w, in SGD, Adam and DOT alike);
    a module whose reference optimizer uses wd' passes its parameters through DecayAdjust with delta = wd' - wd, so
    the step sees grad + wd' * w exactly."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, delta: float) -> torch.Tensor:
        ctx.delta = delta
        ctx.save_for_backward(weight)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad + ctx.delta * weight.detach(), None


def decay_adjusted(weight: torch.Tensor, delta: float) -> torch.Tensor:
    """`weight` as it enters the forward, its gradient offset by delta * weight (delta 0: the weight itself)."""
    return weight if delta == 0 else DecayAdjust.apply(weight, delta)
