"""One job: data -> teacher (given, stored, or trained once) -> method stages -> training with per-epoch eval.

Readable top to bottom: run() wraps train() with the run record; fit() is the epoch loop; train_epoch() the step.
Every epoch draws its data order, augmentation and dropout from seeds derived from (seed, epoch), so a run
resumed from its per-epoch checkpoint finishes exactly as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from kdbench.data import Augment, DeviceLoader, Split, StreamLoader, load_splits
from kdbench.distill import Method, PairInfo, create_method, method_class
from kdbench.errors import KDBenchError, NonFiniteLoss
from kdbench.io import config_hash, load_torch, save_torch
from kdbench.loggers import create_logger
from kdbench.models import TapModel, count_parameters, create_model, probe_taps
from kdbench.optim import apply_max_norm, backward_step, build_optimizer
from kdbench.record import RunRecord

CHECKPOINT_FILE = "checkpoint.pt"
# Keys that do not change what a run computes; left out of the config hash (and of teacher-store keys).
_VOLATILE = {"paths": None, "logger": None, "dry_run": None, "dry_run_tflops": None, "dataset": ("root", "download"),
             "trainer": ("device", "progress", "resume", "num_workers", "data_on_device", "eval_batch_size",
                         "teacher_cache", "teacher_cache_gb")}


def semantic_config(cfg: DictConfig) -> dict:
    data = OmegaConf.to_container(cfg, resolve=True)
    for key, fields in _VOLATILE.items():
        if fields is None:
            data.pop(key, None)
        elif isinstance(data.get(key), dict):
            data[key] = {k: v for k, v in data[key].items() if k not in fields}
    return data


def dataset_label(ds: DictConfig) -> str:
    """The dataset as leaderboards name it: a transfer set without some classes is its own dataset, named by the
    classes left out (mnist-no3) or, when fewer are kept, by those kept (mnist-only78)."""
    excluded = sorted(int(c) for c in ds.get("exclude_train_classes") or [])
    if not excluded:
        return str(ds.name)
    kept = [c for c in range(int(ds.num_classes)) if c not in excluded]
    if len(kept) < len(excluded):
        return f"{ds.name}-only{''.join(map(str, kept))}"
    return f"{ds.name}-no{''.join(map(str, excluded))}"


def labels_of(cfg: DictConfig) -> dict:
    needs_teacher = method_class(cfg.method.name).needs_teacher
    return {"dataset": dataset_label(cfg.dataset), "teacher": cfg.teacher.label if needs_teacher else None,
            "student": cfg.student.label, "method": cfg.method.get("label") or cfg.method.name}


def run(cfg: DictConfig, out_dir: Path, overrides: tuple[str, ...] = ()) -> dict:
    """Train one job and keep its record current in out_dir/metrics.json. Re-raises any failure after recording it."""
    out_dir = Path(out_dir)
    labels = labels_of(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    record = RunRecord.start(out_dir, config=config, config_hash=config_hash(semantic_config(cfg)), labels=labels,
                             seed=int(cfg.seed), overrides=list(overrides))
    logger = None
    try:
        logger = create_logger(cfg.get("logger"), out_dir, labels, config)
        train(cfg, out_dir, record, logger)
        record.complete()
    except BaseException as err:
        record.fail(err)
        raise
    finally:
        if logger is not None:
            logger.finish(record.data["status"])
    return record.data


# ----------------------------------------------------------------------------- set-up


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KDBenchError(f"trainer.device={name} but CUDA is not available; use trainer.device=auto or cpu")
    return torch.device(name)


def configure_determinism(deterministic: bool) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise KDBenchError(f"trainer.precision must be fp32 or bf16, got '{precision}'")


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """Independent, reproducible seeds per (run seed, epoch, stream): stream 0 = data, 1 = dropout etc."""
    return (int(seed) * 1_000_003 + epoch * 7_919 + stream * 104_729) % (2**31 - 1)


@dataclass
class Data:
    train: Split
    test: Split
    train_loader: DeviceLoader | StreamLoader
    test_loader: DeviceLoader | StreamLoader
    input_shape: tuple[int, ...]
    num_classes: int


def prepare_data(cfg: DictConfig, device: torch.device) -> Data:
    ds, tr = cfg.dataset, cfg.trainer
    train, test = load_splits(ds)
    loader_cls, extra = (DeviceLoader, {}) if tr.data_on_device else (StreamLoader, {"num_workers": tr.num_workers})
    norm = (list(ds.mean), list(ds.std), device)
    return Data(
        train, test,
        loader_cls(train, tr.batch_size, *norm, augment=Augment(ds.crop_padding, ds.hflip), shuffle=True, **extra),
        loader_cls(test, tr.eval_batch_size, *norm, **extra),
        tuple(train.images.shape[1:]), int(ds.num_classes),
    )


def lr_at(epoch: int, base_lr: float, schedule: DictConfig, epochs: int) -> float:
    """LR for 1-indexed `epoch`, set once per epoch. step: the CRD rule lr0 * gamma^#{m : epoch > m}."""
    if schedule.name == "step":
        return base_lr * schedule.gamma ** sum(epoch > m for m in schedule.milestones)
    if schedule.name == "cosine":
        return schedule.min_lr + (base_lr - schedule.min_lr) * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))
    if schedule.name == "constant":
        return base_lr
    raise KDBenchError(f"unknown schedule '{schedule.name}'; use step, cosine or constant")


# ----------------------------------------------------------------------------- training


@dataclass
class Evaluation:
    top1: float
    errors: int
    loss: float
    n: int
    class_errors: list[int]  # misclassified test samples per true class


@torch.no_grad()
def evaluate(model: TapModel, loader, precision: str = "fp32") -> Evaluation:
    was_training = model.training
    model.eval()
    correct = loss = n = 0
    class_errors = None
    for batch in loader.epoch():
        with autocast(batch.inputs.device, precision):
            logits = model(batch.inputs)
        hit = logits.argmax(1) == batch.targets
        correct += hit.sum().item()
        loss += F.cross_entropy(logits.float(), batch.targets, reduction="sum").item()
        wrong = torch.bincount(batch.targets[~hit], minlength=logits.shape[1])
        class_errors = wrong if class_errors is None else class_errors + wrong
        n += len(batch)
    model.train(was_training)
    return Evaluation(100.0 * correct / n, n - correct, loss / n, n, class_errors.tolist())


def teacher_forward(teacher: TapModel, inputs: torch.Tensor, taps) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return teacher.forward_taps(inputs, taps)


class TeacherCache:
    """The teacher's outputs for every training sample, computed once and gathered by batch.indices.

    Exact only when a sample's teacher output never changes: no random augmentation and the teacher in eval mode
    (cached_teacher() checks both). Distillation then costs about as much as plain training.
    """

    def __init__(self, teacher: TapModel, loader, taps, precision: str):
        self.outputs: dict[str, torch.Tensor] = {}
        for batch in loader.epoch(0):
            with autocast(batch.inputs.device, precision):
                out = teacher_forward(teacher, batch.inputs, taps)
            for name in (*taps, "logits"):
                if name not in self.outputs:
                    self.outputs[name] = out[name].new_empty(loader.num_samples, *out[name].shape[1:])
                self.outputs[name][batch.indices] = out[name]

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        return {name: value[batch.indices] for name, value in self.outputs.items()}


def cached_teacher(cfg: DictConfig, teacher: Optional[TapModel], method: Method, data: Data,
                   teacher_shapes) -> Optional[TeacherCache]:
    """A TeacherCache when it is exact and fits in trainer.teacher_cache_gb; None otherwise."""
    if teacher is None or not cfg.trainer.teacher_cache or data.train_loader.augment.active or method.teacher_train_mode:
        return None
    numel = sum(math.prod(teacher_shapes[t]) for t in {*method.teacher_taps, "logits"})
    if numel * len(data.train) * 4 > cfg.trainer.teacher_cache_gb * 2**30:
        return None
    return TeacherCache(teacher.eval(), data.train_loader, method.teacher_taps, cfg.trainer.precision)


LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def train_epoch(student: TapModel, method: Method, teacher: Optional[TapModel], loader, optimizer, loss_fn: LossFn,
                student_taps, teacher_taps, seed: int, epoch: int, precision: str, forward=None,
                teacher_cache: Optional[TeacherCache] = None, task_weight: float = 0.0,
                max_norm: Optional[float] = None) -> dict[str, float]:
    """One pass over the training data; returns the sample-weighted mean of every loss term."""
    student.train()
    method.train()
    if teacher is not None:
        teacher.train(method.teacher_train_mode)
    forward = forward or student.forward_taps
    torch.manual_seed(epoch_seed(seed, epoch, stream=1))
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for batch in loader.epoch(epoch_seed(seed, epoch)):
        with autocast(batch.inputs.device, precision):
            if teacher_cache is not None:
                t_out = teacher_cache(batch)
            else:
                t_out = teacher_forward(teacher, batch.inputs, teacher_taps) if teacher is not None else None
            s_out = forward(batch.inputs, student_taps)
            total, terms = loss_fn(batch, s_out, t_out)
        optimizer.zero_grad(set_to_none=True)
        backward_step(optimizer, total, task_weight * terms["ce"] if task_weight else None)
        if max_norm:
            apply_max_norm(optimizer, max_norm)
        for name, value in (("loss", total), *terms.items()):
            sums[name] = sums.get(name, 0.0) + value.detach().float() * len(batch)
        n += len(batch)
    means = {k: v.item() / n for k, v in sums.items()}  # one device sync per epoch
    bad = sorted(k for k, v in means.items() if not math.isfinite(v))
    if bad:
        raise NonFiniteLoss(f"loss term(s) {bad} became non-finite in epoch {epoch}; lower optim.lr, check the "
                            f"method weights, or use trainer.precision=fp32. Epochs before this one are in the record.")
    return means


def _summary(history: list[dict]) -> dict:
    best = max(history, key=lambda h: h["test_top1"])
    last = history[-1]
    return {"last_top1": last["test_top1"], "last_errors": last["test_errors"], "best_top1": best["test_top1"],
            "best_errors": best["test_errors"], "best_epoch": best["epoch"], "epochs_done": last["epoch"]}


def fit(cfg: DictConfig, student: TapModel, method: Method, teacher: Optional[TapModel], data: Data, out_dir: Path,
        record: RunRecord, logger, teacher_cache: Optional[TeacherCache] = None) -> None:
    tr = cfg.trainer
    seed = int(cfg.seed)
    ckpt_path = out_dir / CHECKPOINT_FILE
    state = load_torch(ckpt_path, "run checkpoint") if tr.resume and ckpt_path.exists() else None
    if state is not None:
        student.load_state_dict(state["student"])
        method.load_state_dict(state["method"])
    stages_done = list(state["stages_done"]) if state else []
    forward = torch.compile(student.forward_taps) if tr.compile else None

    for stage in method.stages(student, teacher):
        if stage.name in stages_done:
            continue
        optimizer = torch.optim.SGD(stage.parameters, lr=stage.lr, momentum=stage.momentum, weight_decay=stage.weight_decay)
        loss_fn = lambda b, s, t, stage=stage: (lambda v: (v, {stage.name: v}))(stage.loss(b, s, t))  # noqa: E731
        for epoch in tqdm(range(1, stage.epochs + 1), desc=f"{method.method_name}:{stage.name}", disable=not tr.progress, leave=False):
            train_epoch(student, method, teacher, data.train_loader, optimizer, loss_fn, stage.student_taps,
                        stage.teacher_taps, seed + 7_777, epoch, tr.precision)
        stages_done.append(stage.name)
        save_torch(ckpt_path, {"epoch": 0, "stages_done": stages_done, "student": student.state_dict(),
                               "method": method.state_dict(), "optimizer": None, "history": []})

    params = [p for p in chain(student.parameters(), method.trainable_parameters()) if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim)
    history: list[dict] = []
    start = 1
    if state is not None and state["epoch"] > 0:
        optimizer.load_state_dict(state["optimizer"])
        history, start = list(state["history"]), state["epoch"] + 1
        # a finished run launched again keeps its results
        record.update(history=history, last_class_errors=state.get("class_errors"), **_summary(history))

    bar = tqdm(range(start, tr.epochs + 1), desc=f"{record.data['method']} {record.data['student']} s{seed}",
               disable=not tr.progress, initial=start - 1, total=tr.epochs)
    for epoch in bar:
        lr = lr_at(epoch, cfg.optim.lr, cfg.schedule, tr.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.time()
        train_stats = train_epoch(student, method, teacher, data.train_loader, optimizer,
                                  lambda b, s, t: method.loss(b, s, t, epoch), method.student_taps,
                                  method.teacher_taps, seed, epoch, tr.precision, forward, teacher_cache,
                                  method.term_weights(epoch).get("ce", 0.0), cfg.optim.get("max_norm"))
        ev = evaluate(student, data.test_loader, tr.precision)
        history.append({"epoch": epoch, "lr": lr, "train": train_stats, "test_top1": ev.top1, "test_errors": ev.errors,
                        "test_loss": ev.loss, "seconds": round(time.time() - t0, 3)})
        save_torch(ckpt_path, {"epoch": epoch, "stages_done": stages_done, "student": student.state_dict(),
                               "method": method.state_dict(), "optimizer": optimizer.state_dict(), "history": history,
                               "class_errors": ev.class_errors})
        record.update(history=history, last_class_errors=ev.class_errors, **_summary(history))
        logger.log({"lr": lr, "test/top1": ev.top1, "test/loss": ev.loss, **{f"train/{k}": v for k, v in train_stats.items()}}, step=epoch)
        bar.set_postfix(top1=f"{ev.top1:.2f}", loss=f"{train_stats['loss']:.3f}")


def train(cfg: DictConfig, out_dir: Path, record: RunRecord, logger) -> tuple[TapModel, Method]:
    from kdbench.teachers import obtain_teacher

    configure_determinism(cfg.trainer.deterministic)
    device = resolve_device(cfg.trainer.device)
    data = prepare_data(cfg, device)
    record.update(device=str(device), n_train=len(data.train), n_test=len(data.test))

    teacher = teacher_shapes = None
    if method_class(cfg.method.name).needs_teacher:
        teacher, source = obtain_teacher(cfg, data, device, record.data.get("overrides") or ())
        record.update(teacher_source=source, teacher_top1=evaluate(teacher, data.test_loader, cfg.trainer.precision).top1)
        teacher_shapes = probe_taps(teacher, data.input_shape)

    torch.manual_seed(int(cfg.seed))
    student = build_model(cfg.student.model, data).to(device)
    pair = PairInfo(student, teacher, probe_taps(student, data.input_shape), teacher_shapes, cfg.student.label,
                    cfg.teacher.label if teacher is not None else None, data.num_classes, data.train.labels,
                    int(cfg.trainer.epochs), float(cfg.optim.lr), data.input_shape)
    method = create_method(cfg.method, pair).to(device)
    cache = cached_teacher(cfg, teacher, method, data, teacher_shapes)
    record.update(student_params=count_parameters(student), extra_params=count_parameters(method),
                  teacher_cache=cache is not None)
    fit(cfg, student, method, teacher, data, out_dir, record, logger, cache)
    return student, method


def build_model(model_cfg: DictConfig, data: Data) -> TapModel:
    kwargs = OmegaConf.to_container(model_cfg, resolve=True)
    return create_model(kwargs.pop("name"), num_classes=data.num_classes, input_shape=data.input_shape, **kwargs)
