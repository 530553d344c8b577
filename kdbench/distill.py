"""The method plugin interface.

A method is an nn.Module (its trainable auxiliary heads are submodules, so they join the optimizer and the
checkpoint) that turns student/teacher taps into named, unweighted loss terms. The trainer runs the teacher
forward itself (eval mode, no grad) and hands the outputs in, so one teacher forward can feed several students.

  - student_taps / teacher_taps: the features it needs (names from kdbench.models.base)
  - built from a PairInfo: probed tap shapes, so heads size themselves; incompatible pairs raise
    IncompatibleModels before training starts
  - terms(): named loss terms; their weights come from `method.weights` in the config, and term_weights(epoch)
    may scale them per epoch (DKD/ReviewKD warm-up)
  - stages(): optional pre-training stages before main training (AB, FSP, FT)
  - per-sample state keyed by dataset index lives in buffers (batch.indices gives the keys)

Plugins register with @register_method("name") in `kdbench/methods/<name>.py`, or from
another package through the entry-point group "kdbench.methods".
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.data.loader import Batch
from kdbench.errors import IncompatibleModels, KDBenchError
from kdbench.models.base import TapModel
from kdbench.registry import Registry

Outputs = dict[str, torch.Tensor]


@dataclass
class PairInfo:
    """What a method sees when it builds itself."""

    student: TapModel
    teacher: Optional[TapModel]
    student_shapes: dict[str, tuple[int, ...]]  # every student tap -> shape without batch dim
    teacher_shapes: Optional[dict[str, tuple[int, ...]]]
    student_name: str
    teacher_name: Optional[str]
    num_classes: int
    train_labels: torch.Tensor  # labels of the training set, by dataset index
    epochs: int
    lr: float  # the run's base learning rate (pre-training stages derive theirs from it)
    input_shape: tuple[int, ...] = ()  # (C, H, W) of the inputs, for methods that build extra networks (DML peers)

    def incompatible(self, method: str, detail: str) -> IncompatibleModels:
        return IncompatibleModels(f"method '{method}' cannot distill {self.teacher_name} -> {self.student_name}: {detail}")


@dataclass
class Stage:
    """A pre-training stage: `epochs` of SGD at a constant `lr` over `parameters`, minimising `loss` (no CE)."""

    name: str
    epochs: int
    lr: float
    parameters: list[nn.Parameter]
    loss: Callable[[Batch, Outputs, Optional[Outputs]], torch.Tensor]
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()
    momentum: float = 0.9
    weight_decay: float = 5e-4


class Method(nn.Module):
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()
    needs_teacher: bool = True
    teacher_train_mode: bool = False  # MD's OFD runs the teacher's BN in train mode

    def __init__(self, cfg, pair: PairInfo):
        super().__init__()
        self.method_name = str(cfg.name)
        self.weights = {str(k): float(v) for k, v in cfg.weights.items()}

    def terms(self, batch: Batch, student: Outputs, teacher: Optional[Outputs]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def term_weights(self, epoch: int) -> dict[str, float]:
        """Weights for 1-indexed `epoch`; override for warm-ups."""
        return self.weights

    def stages(self, student: TapModel, teacher: Optional[TapModel]) -> list[Stage]:
        return []

    def trainable_parameters(self):
        """Auxiliary parameters that join the main optimizer (default: all); stage-only heads are left out."""
        return self.parameters()

    def loss(self, batch: Batch, student: Outputs, teacher: Optional[Outputs], epoch: int):
        """(weighted total, unweighted terms). Terms with weight 0 are computed for logging but not summed."""
        terms = self.terms(batch, student, teacher)
        weights = self.term_weights(epoch)
        missing = terms.keys() - weights.keys()
        if missing:
            raise KDBenchError(f"method '{self.method_name}' has no weight for loss term(s) {sorted(missing)}; "
                               f"set method.weights.<term> in its config")
        total = sum(weights[k] * v for k, v in terms.items() if weights[k] != 0)
        return total, terms


def cross_entropy(student: Outputs, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(student["logits"], batch.targets)


METHODS: Registry[type[Method]] = Registry("method")
register_method = METHODS.register
_loaded = False


def load_method_plugins() -> None:
    """Import the built-in plugin files and any installed through the 'kdbench.methods' entry-point group."""
    global _loaded
    if _loaded:
        return
    import kdbench.methods as builtin

    for info in pkgutil.iter_modules(builtin.__path__):
        importlib.import_module(f"kdbench.methods.{info.name}")
    for ep in entry_points(group="kdbench.methods"):
        ep.load()
    _loaded = True


def list_methods() -> list[str]:
    load_method_plugins()
    return METHODS.names()


def method_class(name: str) -> type[Method]:
    load_method_plugins()
    return METHODS.get(name)


def create_method(cfg, pair: PairInfo) -> Method:
    method = method_class(cfg.name)(cfg, pair)
    for side, taps, model in (("student", method.student_taps, pair.student), ("teacher", method.teacher_taps, pair.teacher)):
        missing = [t for t in taps if model is None or t not in model.tap_names]
        if missing:
            have = ", ".join(model.tap_names) if model is not None else "no teacher"
            raise pair.incompatible(cfg.name, f"the {side} lacks tap(s) {missing} (it has: {have})")
    return method
