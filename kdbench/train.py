"""The training loop, and nothing else: it receives built objects (student, method or stage, teacher outputs,
loaders, step policy, schedule, callbacks) and never a config. kdbench.job builds them and runs it.

Every epoch draws its data order, augmentation and dropout from seeds derived from (seed, epoch), so a run
resumed from its per-epoch checkpoint finishes exactly as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kdbench.distributed import SINGLE, all_sum, all_sum_tensor
from kdbench.errors import KDBenchError, NonFiniteLoss
from kdbench.models import TapModel
from kdbench.optim import StepPolicy
from kdbench.teachers import TeacherOutputs


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """trainer.device as a torch device; `auto` and `cuda` mean the process's own GPU (its local rank)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KDBenchError(f"trainer.device={name} but CUDA is not available; use trainer.device=auto or cpu")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


def configure_determinism(deterministic: bool) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":  # the step policy scales the loss (kdbench.optim.grad_scaler)
        return torch.autocast(device.type, dtype=torch.float16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise KDBenchError(f"trainer.precision must be fp32, bf16 or fp16, got '{precision}'")


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """Independent, reproducible seeds per (run seed, epoch, stream): stream 0 = data, 1 = dropout etc."""
    return (int(seed) * 1_000_003 + epoch * 7_919 + stream * 104_729) % (2**31 - 1)


# ----------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    top1: float
    errors: int
    loss: float
    n: int
    class_errors: list[int]  # misclassified test samples per true class
    top5: Optional[float] = None  # with at least 10 classes


@torch.no_grad()
def evaluate(model: TapModel, loader, precision: str = "fp32", logits_of: Optional[Callable] = None) -> Evaluation:
    """Top-1, errors, mean CE and per-class errors of `model` in eval mode (`logits_of(model, x)` if the method
    evaluates another way, e.g. SimKD's teacher classifier); the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    correct = correct5 = loss = n = 0
    class_errors = None
    for batch in loader.epoch():
        with autocast(batch.inputs.device, precision):
            logits = logits_of(model, batch.inputs) if logits_of is not None else model(batch.inputs)
        hit = logits.argmax(1) == batch.targets
        correct += hit.sum().item()
        if logits.shape[1] >= 10:
            correct5 += (logits.topk(5, dim=1).indices == batch.targets[:, None]).any(1).sum().item()
        loss += F.cross_entropy(logits.float(), batch.targets, reduction="sum").item()
        wrong = torch.bincount(batch.targets[~hit], minlength=logits.shape[1])
        class_errors = wrong if class_errors is None else class_errors + wrong
        n += len(batch)
    model.train(was_training)
    w = getattr(loader, "world", SINGLE)
    if w.distributed:  # each rank saw its share of the test set
        correct, correct5, loss, n = all_sum([correct, correct5, loss, n], w, class_errors.device)
        correct, n = int(correct), int(n)
        class_errors = all_sum_tensor(class_errors, w)
    top5 = 100.0 * correct5 / n if len(class_errors) >= 10 else None
    return Evaluation(100.0 * correct / n, n - correct, loss / n, n, class_errors.tolist(), top5)


# ----------------------------------------------------------------------------- one epoch


class Stepper(Protocol):
    """What the loop trains with: a Method, or a pre-training Stage (kdbench.distill)."""

    def train(self, mode: bool = True): ...

    def batches(self, loader, seed: int): ...

    def train_step(self, batch, step: "StepContext") -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def task_loss(self, terms: dict[str, torch.Tensor], epoch: int) -> Optional[torch.Tensor]: ...


@dataclass
class Run:
    """One training phase (a pre-training stage or main training), resolved once."""

    student: TapModel
    stepper: Stepper
    teacher: Optional[TeacherOutputs]
    loader: object  # kdbench.data DeviceLoader | StreamLoader
    step: StepPolicy
    seed: int
    precision: str = "fp32"
    forward: Optional[Callable] = None  # the student's forward_taps, or its torch.compile'd version
    teachers: tuple[TeacherOutputs, ...] = ()  # every teacher of a multi-teacher method (teacher = the first)


@dataclass
class StepContext:
    """What a Method.train_step sees: the student's forward, the teacher outputs, the epoch, autocast and update."""

    run: Run
    epoch: int
    device: torch.device
    batch: Optional[object] = None  # the batch being trained on (its share of a distributed global batch)

    @property
    def teacher(self) -> Optional[TeacherOutputs]:
        return self.run.teacher

    @property
    def teachers(self) -> tuple[TeacherOutputs, ...]:
        return self.run.teachers or ((self.run.teacher,) if self.run.teacher is not None else ())

    @property
    def forward(self) -> Callable:
        return self.run.forward or self.run.student.forward_taps

    def autocast(self):
        return autocast(self.device, self.run.precision)

    def update(self, stepper: Stepper, total: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """One step of the run's policy; policies that separate the task gradient (DOT) get the task part."""
        policy = self.run.step
        share = getattr(self.batch, "share", 1.0)
        policy.step(total, stepper.task_loss(terms, self.epoch) if policy.separates_task else None, share)


@dataclass
class Tally:
    """One run's epoch in progress: its step context and the sample-weighted sums of its loss terms."""

    step: StepContext
    sums: dict
    n: int = 0
    rng: Optional[tuple] = None  # in a cohort: the run's own global RNG state between its steps


def begin_epoch(run: Run, epoch: int) -> Tally:
    """Modes for training, and the epoch's dropout (global RNG) seed."""
    run.student.train()
    run.stepper.train()
    for teacher in (run.teachers or ((run.teacher,) if run.teacher is not None else ())):
        teacher.start_epoch()
    torch.manual_seed(epoch_seed(run.seed, epoch, stream=1))
    return Tally(StepContext(run, epoch, run.loader.device), {})


def train_batch(run: Run, tally: Tally, batch) -> None:
    tally.step.batch = batch
    total, terms = run.stepper.train_step(batch, tally.step)
    for name, value in (("loss", total), *terms.items()):
        tally.sums[name] = tally.sums.get(name, 0.0) + value.detach().float() * len(batch)
    tally.n += len(batch)


def end_epoch(run: Run, tally: Tally) -> dict[str, float]:
    """The epoch's mean of every loss term (over every rank's samples); non-finite ones stop the run."""
    sums, n, device = tally.sums, tally.n, tally.step.device
    w = getattr(run.loader, "world", SINGLE)
    if w.distributed:  # the epoch's means over every rank's samples (and the same on every rank)
        names = sorted(sums)
        totals = all_sum_tensor(torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device)
                                             for k in names] + [torch.tensor(float(n), dtype=torch.float64,
                                                                             device=device)]), w)
        sums, n = dict(zip(names, totals[:-1])), totals[-1].item()
    means = {k: v.item() / n for k, v in sums.items()}  # one device sync per epoch
    bad = sorted(k for k, v in means.items() if not math.isfinite(v))
    if bad:
        raise NonFiniteLoss(f"loss term(s) {bad} became non-finite in epoch {tally.step.epoch}; lower optim.lr, check "
                            f"the method weights, or use trainer.precision=fp32. Epochs before this one are in the "
                            f"record.")
    return means


def drawn_under_autocast(batches, device: torch.device, precision: str):
    """Each batch drawn under the run's autocast: a method that makes its batches with a network of its own (a
    data-free generator) runs it at the run's precision, as the step runs its networks. A loader's batches have no
    operation autocast changes (it casts matmuls and convolutions), and fp32 is no autocast at all."""
    batches = iter(batches)
    while True:
        with autocast(device, precision):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def train_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One pass over the training data; returns the sample-weighted mean of every loss term."""
    tally = begin_epoch(run, epoch)
    device = next(run.student.parameters()).device
    for batch in drawn_under_autocast(run.stepper.batches(run.loader, epoch_seed(run.seed, epoch)), device,
                                      run.precision):
        train_batch(run, tally, batch)
    return end_epoch(run, tally)


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def train_together(runs: Sequence[Run], epoch: int) -> list:
    """One epoch of several runs over the same batches (a cohort, kdbench.cohort): each batch is drawn and augmented
    once and each run takes its own step on it. Every run keeps its own global RNG stream (dropout, a method's
    negatives), swapped in around its steps, so each run's epoch is the one it trains alone. Returns each run's
    means, or the exception that stopped it (the others go on)."""
    device = runs[0].loader.device
    tallies, results = [], [None] * len(runs)
    for run in runs:
        tallies.append(begin_epoch(run, epoch))
        tallies[-1].rng = _rng_state(device)
    # teacher outputs shared by the cohort (kdbench.cohort) compute the union of the members' taps once per batch
    shared = [t for run in runs for t in (run.teachers or ((run.teacher,) if run.teacher is not None else ()))
              if hasattr(t, "begin_batch")]
    for batch in runs[0].loader.epoch(epoch_seed(runs[0].seed, epoch)):
        for teacher in shared:
            teacher.begin_batch(batch)
        for i, (run, tally) in enumerate(zip(runs, tallies)):
            if results[i] is not None:
                continue
            _set_rng_state(tally.rng, device)
            try:
                train_batch(run, tally, batch)
            except Exception as err:  # noqa: BLE001  (a member's failure is its own)
                results[i] = err
            tally.rng = _rng_state(device)
    for i, (run, tally) in enumerate(zip(runs, tallies)):
        if results[i] is None:
            try:
                results[i] = end_epoch(run, tally)
            except Exception as err:  # noqa: BLE001
                results[i] = err
    return results


# ----------------------------------------------------------------------------- the epoch loop


EpochCallback = Callable[[dict, Optional[Evaluation]], None]


def fit(run: Run, epochs: Sequence[int], lr_at: Callable[[int], float],
        evaluation: Optional[Callable[[], tuple[dict, Evaluation]]] = None, callbacks: Sequence[EpochCallback] = (),
        progress: Optional[str] = None, total: Optional[int] = None) -> None:
    """Train `epochs` (1-indexed), setting the LR once per epoch; with an evaluation (-> the history fields and the
    main Evaluation), evaluate after each epoch. Each epoch ends with callbacks(history entry, evaluation): the
    record, the checkpoint, the logger."""
    lines = progress is not None and not _is_terminal(sys.stderr)  # piped or in a log file: plain lines, no frames
    bar = tqdm(epochs, desc=progress, disable=progress is None or lines, leave=evaluation is not None,
               initial=(epochs[0] - 1) if len(epochs) else 0, total=total or len(epochs))
    every, last = progress_every(), (epochs[-1] if len(epochs) else 0)
    for epoch in bar:
        lr = lr_at(epoch)
        run.step.set_lr(lr)
        t0 = time.time()
        entry = {"epoch": epoch, "lr": lr, "train": train_epoch(run, epoch)}
        ev = None
        if evaluation is not None:
            fields, ev = evaluation()
            entry.update(fields)
            bar.set_postfix(top1=f"{ev.top1:.2f}", loss=f"{entry['train']['loss']:.3f}")
        entry["seconds"] = round(time.time() - t0, 3)
        for callback in callbacks:
            callback(entry, ev)
        if lines and (epoch % every == 0 or epoch == last):
            print(progress_line(progress, epoch, total or last, entry, ev), file=sys.stderr, flush=True)


@dataclass
class Member:
    """A run in a cohort, with what fit() takes for it alone: its LR schedule, evaluation and end-of-epoch callbacks,
    the first epoch it has not done (resumed members join later), and what to do when it fails."""

    run: Run
    lr_at: Callable[[int], float]
    evaluation: Callable[[], tuple[dict, Evaluation]]
    callbacks: Sequence[EpochCallback]
    start: int
    on_failure: Callable[[BaseException], None]
    name: str = ""
    failed: Optional[BaseException] = None


def fit_cohort(members: Sequence[Member], total: int, progress: bool = False) -> None:
    """fit() for a cohort: epochs start..total of every member in lockstep over shared batches (train_together),
    then each member's evaluation and callbacks. A failing member is handed to its on_failure and left out; the
    others go on."""
    for epoch in range(min(m.start for m in members), total + 1):
        active = [m for m in members if m.start <= epoch and m.failed is None]
        if not active:
            return
        t0 = time.time()
        lrs = [m.lr_at(epoch) for m in active]
        for m, lr in zip(active, lrs):
            m.run.step.set_lr(lr)
        results = train_together([m.run for m in active], epoch)
        seconds = round((time.time() - t0) / len(active), 3)  # the epoch's time, shared equally
        for m, lr, result in zip(active, lrs, results):
            try:
                if isinstance(result, BaseException):
                    raise result
                entry = {"epoch": epoch, "lr": lr, "train": result}
                fields, ev = m.evaluation()
                entry.update(fields)
                entry["seconds"] = seconds
                for callback in m.callbacks:
                    callback(entry, ev)
            except Exception as err:  # noqa: BLE001
                m.failed = err
                m.on_failure(err)
                continue
            if progress:
                print(progress_line(m.name, epoch, total, entry, ev), file=sys.stderr, flush=True)


PROGRESS_EVERY_SETTING = "KDBENCH_PROGRESS_EVERY"


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_every() -> int:
    """Epochs between progress lines when the output is not a terminal (KDBENCH_PROGRESS_EVERY, default 1; the last
    epoch always gets one)."""
    try:
        return max(1, int(os.environ.get(PROGRESS_EVERY_SETTING, "1")))
    except ValueError:
        return 1


def progress_line(name: str, epoch: int, total: int, entry: dict, ev: Optional["Evaluation"]) -> str:
    """'kd mlp_32 s1: epoch 3/30 loss 0.412 top1 93.33 lr 0.05 (1.2 s)': one line per epoch for logs."""
    text = f"{name}: epoch {epoch}/{total} loss {entry['train'].get('loss', float('nan')):.4g}"
    if ev is not None:
        text += f" top1 {ev.top1:.2f}"
    return text + f" lr {entry['lr']:.4g} ({entry['seconds']:.1f} s)"


def summary(history: list[dict]) -> dict:
    """The record's headline numbers from its per-epoch history: last epoch, best epoch (first of ties); top-5 as
    the top-5 of those epochs (the best epoch is chosen by top-1) when the history has it."""
    best = max(history, key=lambda h: h["test_top1"])
    last = history[-1]
    out = {"last_top1": last["test_top1"], "last_errors": last["test_errors"], "best_top1": best["test_top1"],
           "best_errors": best["test_errors"], "best_epoch": best["epoch"], "epochs_done": last["epoch"]}
    if last.get("test_top5") is not None:
        out.update(last_top5=last["test_top5"], best_top5=best.get("test_top5"))
    return out
