"""The method plugin interface.

A method is an nn.Module (its trainable auxiliary heads are submodules, so they join the optimizer and the
checkpoint) that turns student/teacher taps into named, unweighted loss terms. The loop hands it the teacher's
outputs (kdbench.teachers.TeacherOutputs: a live forward or a cache), so one teacher forward can feed several
students.

  - student_taps / teacher_taps: the features it needs (names from kdbench.models.base)
  - built from a PairInfo: probed tap shapes, so heads size themselves; incompatible pairs raise
    IncompatibleModels before training starts
  - terms(): its own named loss terms. The base class adds the `ce` term (cross-entropy on the labels) and, when
    `weights.kd` is given, Hinton's `kd` term (temperature `temperature`, default 4) from the configured weights.
    Weights come from `method.weights`; term_weights(epoch) may scale them per epoch (DKD/ReviewKD warm-up).
  - stages(): optional pre-training stages before main training (AB, FSP, FT), run by the same loop
  - per-sample state keyed by dataset index lives in buffers (batch.indices gives the keys)
  - a method that must own its training step (a generator step before the student step, several networks updated
    together, extra views of a batch) overrides train_step(); one that evaluates differently (SimKD's teacher
    classifier) overrides eval_logits(). Defaults are the plain distillation step and the student's own logits.
  - teacher_train_mode (class attribute or the `teacher_train_mode` option): the mode the teacher runs in during
    training (MD's OFD: BN in train mode)

Plugins register with @register_method("name") in `kdbench/methods/<name>.py`, or from
another package through the entry-point group "kdbench.methods".
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, Optional

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from kdbench.data.loader import Batch
from kdbench.distributed import SINGLE, World
from kdbench.errors import IncompatibleModels, KDBenchError
from kdbench.losses import cross_entropy, kd_loss
from kdbench.models.base import TapModel
from kdbench.registry import Registry

Outputs = dict[str, torch.Tensor]


def _plain(value):
    if isinstance(value, Mapping):
        return Options(value)
    if isinstance(value, (list, tuple)) or (isinstance(value, Sequence) and not isinstance(value, str)):
        return [_plain(v) for v in value]
    return value


class Options(dict):
    """A method's config as plain data (name, label, weights and its own options), read as a dict or by attribute
    (cfg.temperature); nested mappings become Options and sequences lists (a composed DictConfig converts too)."""

    def __init__(self, data=()):
        super().__init__({str(k): _plain(v) for k, v in dict(data).items()})

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"option '{key}' is not set") from None


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
    mean: tuple[float, ...] = ()  # the inputs' per-channel normalisation: batch.inputs = (image in [0, 1] - mean) / std,
    std: tuple[float, ...] = ()  # for methods that make extra views of a batch (strong augmentation, rotations)
    seed: int = 0  # the run's seed: a method's own randomness replays from epoch_seed(seed, epoch, stream)
    teachers: tuple = ()  # a multi-teacher method's teachers (TapModels; `teacher` is the first) ...
    teachers_shapes: tuple = ()  # ... and their probed tap shapes
    world: World = SINGLE  # the processes of a distributed job (per-sample state kept the same on every rank)

    def incompatible(self, method: str, detail: str) -> IncompatibleModels:
        return IncompatibleModels(f"method '{method}' cannot distill {self.teacher_name} -> {self.student_name}: {detail}")


@dataclass
class Stage:
    """A pre-training stage: `epochs` of SGD over `parameters` minimising `loss` (no CE), at `lr` times gamma per
    milestone passed (the step rule: constant when there are none). A stage whose loss reads no student output
    (`uses_student=False`: FT's paraphraser, SSKD's teacher head) runs no student forward, so the student's BatchNorm
    statistics stay as they are, as RepDistiller's init stage keeps its student in eval mode."""

    name: str
    epochs: int
    lr: float
    parameters: list[nn.Parameter]
    loss: Callable[[Batch, Outputs, Optional[Outputs]], torch.Tensor]
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    uses_student: bool = True

    def lr_at(self, epoch: int) -> float:
        return self.lr * self.gamma ** sum(epoch > m for m in self.milestones)


class StageStep:
    """A pre-training stage as the loop trains it: the stage's loss over its own taps (no CE, no task part), with
    the method's modules in train mode."""

    def __init__(self, stage: Stage, method: "Method"):
        self.stage, self.method = stage, method

    def train(self, mode: bool = True):
        self.method.train(mode)

    def batches(self, loader, seed: int):
        return loader.epoch(seed)

    def train_step(self, batch: Batch, step) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with step.autocast():
            teacher = step.teacher(batch) if step.teacher is not None else None
            student = step.forward(batch.inputs, self.stage.student_taps) if self.stage.uses_student else None
            total = self.stage.loss(batch, student, teacher)
        terms = {self.stage.name: total}
        step.update(self, total, terms)
        return total, terms

    def task_loss(self, terms, epoch: int) -> None:
        return None


class Method(nn.Module):
    # What `kdbench list methods` shows: the paper ("Authors, Title, Venue Year") and the reference code it follows.
    paper: str = ""
    code: str = ""
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()
    needs_teacher: bool = True
    teacher_train_mode: bool = False  # MD's OFD runs the teacher's BN in train mode
    teacher_cache: bool = True  # False: its teacher outputs come from views of its own (SSKD), never from a cache
    multi_teacher: bool = False  # True: it learns from every teacher of the `teachers` config (pair.teachers)
    task_terms: tuple[str, ...] = ("ce",)  # the terms a step policy that separates them (DOT) treats as the task
    # Passes per training sample, for the dry run's FLOPs (kdbench.plan), in forwards of the model: the student's
    # forward + backward is 3; a method that runs it on several views of each sample (SLA's and SSKD's 4 rotations)
    # or adds a forward without backward (CS-KD's partners) says so; likewise the teacher's forwards per sample.
    student_passes: float = 3.0
    teacher_passes: float = 1.0

    def __init__(self, cfg, pair: PairInfo):
        super().__init__()
        self.method_name = str(cfg.name)
        self.weights = {str(k): float(v) for k, v in cfg.weights.items()}
        self.teacher_train_mode = self.declared_teacher_train_mode(cfg)
        self.kd_temperature = float(cfg.get("temperature", 4.0))  # for the base class's optional `kd` term

    @classmethod
    def declared_teacher_train_mode(cls, options) -> bool:
        """The teacher's mode in training: the `teacher_train_mode` option, else the class's declaration."""
        return bool(options.get("teacher_train_mode", cls.teacher_train_mode))

    def terms(self, batch: Batch, student: Outputs, teacher: Optional[Outputs]) -> dict[str, torch.Tensor]:
        """The method's own unweighted loss terms (the base class adds `ce` and the optional `kd`)."""
        return {}

    def all_terms(self, batch: Batch, student: Outputs, teacher: Optional[Outputs]) -> dict[str, torch.Tensor]:
        out = {"ce": cross_entropy(student, batch)} if "ce" in self.weights else {}
        out.update(self.terms(batch, student, teacher))
        if "kd" in self.weights and "kd" not in out:
            out["kd"] = kd_loss(student["logits"], teacher["logits"], self.kd_temperature)
        return out

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
        terms = self.all_terms(batch, student, teacher)
        weights = self.term_weights(epoch)
        if terms.keys() != weights.keys():
            missing, unused = sorted(terms.keys() - weights.keys()), sorted(weights.keys() - terms.keys())
            if missing:
                raise KDBenchError(f"method '{self.method_name}' has no weight for loss term(s) {missing}; "
                                   f"set method.weights.<term> in its config")
            raise KDBenchError(f"method '{self.method_name}': method.weights names {unused}, which is no loss term of "
                               f"this method (its terms: {', '.join(terms)}); check the spelling")
        total = sum(weights[k] * v for k, v in terms.items() if weights[k] != 0)
        return total, terms

    def task_loss(self, terms: dict[str, torch.Tensor], epoch: int) -> Optional[torch.Tensor]:
        """The weighted task part of the total (None when it has weight 0), for step policies that separate it."""
        weights, task = self.term_weights(epoch), None
        for k in self.task_terms:
            if k in terms and weights.get(k, 0.0):
                task = weights[k] * terms[k] if task is None else task + weights[k] * terms[k]
        return task

    # -- the training step and evaluation; override only when the method needs another one

    def batches(self, loader, seed: int):
        """An epoch's batches (default: the loader's seeded epoch). Override to sample batches another way
        (class-paired batches: `loader.take(indices, generator)`) or to train without the training data (data-free:
        batches of generated images, never touching the loader)."""
        return loader.epoch(seed)

    def forward_loss(self, batch: Batch, step) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher outputs, student forward and loss for one batch (under the step's autocast)."""
        teacher = step.teacher(batch) if step.teacher is not None else None
        student = step.forward(batch.inputs, self.student_taps)
        return self.loss(batch, student, teacher, step.epoch)

    def train_step(self, batch: Batch, step) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step; returns (total, terms) for the epoch's means. `step` is kdbench.train.StepContext:
        the student's forward, the teacher outputs, the step policy, the epoch and the autocast context."""
        with step.autocast():
            total, terms = self.forward_loss(batch, step)
        step.update(self, total, terms)
        return total, terms

    def eval_logits(self, student: TapModel, inputs: torch.Tensor) -> torch.Tensor:
        """The logits a run is evaluated on (default: the student's own)."""
        return student(inputs)

    def extra_heads(self) -> dict[str, Callable[[TapModel, torch.Tensor], torch.Tensor]]:
        """Other networks or heads evaluated each epoch beside the run's own (online peers, exits, an ensemble):
        name -> logits_of(student, inputs). Each becomes a leaderboard row of its own, method `<label>@<name>`."""
        return {}

    def record_fields(self) -> dict:
        """Facts about the method's run the record should carry (which head is evaluated, networks trained)."""
        return {}


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
    """Build a method from its config (an Options, a dict or a composed DictConfig) for a pair."""
    cfg = Options(cfg)
    method = method_class(cfg.name)(cfg, pair)
    for side, taps, model in (("student", method.student_taps, pair.student), ("teacher", method.teacher_taps, pair.teacher)):
        missing = [t for t in taps if model is None or t not in model.tap_names]
        if missing:
            have = ", ".join(model.tap_names) if model is not None else "no teacher"
            raise pair.incompatible(cfg.name, f"the {side} lacks tap(s) {missing} (it has: {have})")
    return method
