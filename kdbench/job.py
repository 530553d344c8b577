"""A job, resolved once: from the composed config (and the overrides that made it) to typed objects, with the chain
of teachers it needs; then run. The real run and the dry run (kdbench.plan) walk the same Job.

    job = resolve(cfg, overrides)     # the only place below the CLI that reads a DictConfig
    record = run(job, out_dir)        # its teacher first (checkpoint | store | trained now), then training

How a teacher is obtained: `teacher.checkpoint` loads a file. Otherwise the teacher comes from the store, trained
once into it when missing, with its data set's standard recipe: the job's experiment, pair, dataset, recipe and
teacher choices compose its training config, but none of the options that only shape the student's run (method,
student, seed, optim, schedule, trainer); `teacher.recipe.<key>=<value>` changes the teacher's recipe explicitly.
So `kdbench method=kd trainer.epochs=2` (a smoke test) distils from the standard teacher, and a search over optim.lr
trains one teacher, not one per trial. A teacher config with `distill: {from, method}` (a teaching assistant,
TAKD) is trained by that distillation job instead of vanilla CE; its own teacher resolves the same way, so chains
nest.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
from dataclasses import dataclass, fields
from traceback import format_exception
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from kdbench import distributed
from kdbench.config import (DatasetConfig, OptimConfig, ScheduleConfig, TrainerConfig, compose, is_semantic,
                            override_key, semantic_config)
from kdbench.data import Data, dataset_label, prepare_data
from kdbench.distill import Method, Options, PairInfo, StageStep, create_method, method_class
from kdbench.errors import ConfigChanged, InvalidSetting, KDBenchError
from kdbench.io import config_hash, load_torch, save_torch, sha256_file, write_json
from kdbench.loggers import create_logger
from kdbench.models import TapModel, count_parameters, create_model, load_reference_checkpoint, probe_taps
from kdbench.optim import build_step, constant_sgd_step, lr_at
from kdbench.record import RECORD_FILE, RunRecord, read_record, signals_deferred
from kdbench import viewcache
from kdbench.teachers import (ANCHORS_DIR, StoreEntry, TeacherOutputs, TeacherStore, cache_bytes, cache_is_exact,
                              outputs_are_pure)
from kdbench.train import (Member, Run, autocast, configure_determinism, evaluate, fit, resolve_device,
                           summary)

CHECKPOINT_FILE = "checkpoint.pt"
HEADS_DIR = "heads"  # <run>/heads/<name>/metrics.json: the records of a method's extra heads
# Pre-training stages draw their data order and dropout from seed + this offset, apart from main training's.
STAGE_SEED_OFFSET = 7_777
# Override keys (with their subkeys) that shape only the student's run, never how its teacher is trained.
STUDENT_SIDE = ("method", "student", "seed", "optim", "schedule", "trainer", "logger")
# ... and of those a stored teacher's own record leaves out too (the pair picks teachers; its student tweaks do not
# belong in a teacher row's setting), so that leaderboards average one recipe's teachers over their seeds.
NOT_IN_TEACHER_RECORD = (*STUDENT_SIDE, "pair", "teacher.seed")
TEACHER_RECORD_MARK = "(teacher for the store)"


def _covers(prefixes: Sequence[str], key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kwargs: dict
    label: str

    @classmethod
    def of(cls, node: DictConfig) -> "ModelSpec":
        kwargs = OmegaConf.to_container(node.model, resolve=True)
        return cls(str(kwargs.pop("name")), kwargs, str(node.label))

    def build(self, num_classes: int, input_shape: Sequence[int]) -> TapModel:
        return create_model(self.name, num_classes=num_classes, input_shape=input_shape, **self.kwargs)


@dataclass(frozen=True)
class TeacherSpec:
    model: ModelSpec
    checkpoint: Optional[Path]  # a weights file, or None: pretrained weights or the store
    entry: Optional[str] = None  # the store entry, '<label>-<key of the job that trains it>'
    job: Optional["Job"] = None  # that job
    recipe: tuple[str, ...] = ()  # its teacher.recipe overrides, as 'key=value' (announced before training)
    pretrained: Optional[str] = None  # torchvision weights of a tv_* model (teacher.weights), from the local cache


@dataclass
class Job:
    config: dict  # the resolved config, as the record keeps it
    overrides: tuple[str, ...]  # as the record keeps them
    labels: dict
    key: str  # hash of the semantic config (config.NON_SEMANTIC left out)
    seed: int
    dataset: DatasetConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    trainer: TrainerConfig
    student: ModelSpec
    method: Options
    teacher: Optional[TeacherSpec]  # the teacher (the first of `teachers`)
    teacher_store: Path
    logger: Options
    recipe_overrides: tuple[str, ...] = ()  # the overrides its teacher's recipe is composed with
    teachers: tuple[TeacherSpec, ...] = ()  # every teacher (several for a multi-teacher method)
    student_init: Optional[Path] = None  # student.init: the weights file the student starts from

    @property
    def teacher_train_mode(self) -> bool:
        return method_class(self.method.name).declared_teacher_train_mode(self.method)


# ----------------------------------------------------------------------------- resolution


def _typed(schema, node: DictConfig, group: str):
    """A schema'd group as its dataclass; a key the schema lacks (e.g. added with '+') is an error naming the
    closest valid key."""
    data = OmegaConf.to_container(node, resolve=True, enum_to_str=True)  # trainer.precision/device: plain strings
    names = [f.name for f in fields(schema)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        hints = [f"'{group}.{k}'" + (f" (did you mean '{group}.{m[0]}'?)" if (m := difflib.get_close_matches(k, names, 1))
                                      else "") for k in unknown]
        raise InvalidSetting(f"unknown setting {', '.join(hints)}; {group} has: {', '.join(names)}")
    return schema(**data)


def _options(node: DictConfig) -> Options:
    return Options(OmegaConf.to_container(node, resolve=True))


def teacher_nodes(cfg: DictConfig) -> list:
    """The teacher configs the job's method learns from: none, `teacher`, or every entry of `teachers` for a
    multi-teacher method."""
    cls = method_class(cfg.method.name)
    if not cls.needs_teacher:
        return []
    if not cls.multi_teacher:
        return [cfg.teacher]
    nodes = list((cfg.get("teachers") or {}).values())
    if not nodes:
        raise InvalidSetting(f"method '{cfg.method.name}' learns from several teachers: name them in `teachers`, e.g. "
                             f"+teacher@teachers.a=resnet56 +teacher@teachers.b=resnet110 (or use an experiment)")
    return nodes


def labels_of(cfg: DictConfig) -> dict:
    nodes = teacher_nodes(cfg)
    return {"dataset": dataset_label(cfg.dataset), "teacher": "+".join(str(n.label) for n in nodes) or None,
            "student": cfg.student.label, "method": cfg.method.get("label") or cfg.method.name}


# Options every method reads (kdbench.distill.Method) besides those its YAML lists; weights.<term> may add a term.
BASE_METHOD_OPTIONS = ("temperature", "teacher_train_mode", "label")


def check_added_method_options(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """A method option added with '+' (the form Hydra suggests for a key the YAML lacks) must be one the method
    reads: a typo is an error naming the closest option, not an option silently ignored."""
    for override in overrides:
        key = override_key(override)
        if not override.lstrip("~").startswith("+") or not key.startswith("method."):
            continue
        option = key[len("method."):]
        if option.startswith("weights.") or option in BASE_METHOD_OPTIONS:
            continue
        known = sorted({str(k) for k in cfg.method.keys()} - {option} | set(BASE_METHOD_OPTIONS))
        close = difflib.get_close_matches(option, known, 1)
        raise InvalidSetting(f"method '{cfg.method.name}' has no option '{option}'"
                             + (f" (did you mean 'method.{close[0]}'?)" if close else "")
                             + f"; its options: {', '.join(known)}")


def resolve(cfg: DictConfig, overrides: Sequence[str] = (), recipe_overrides: Optional[Sequence[str]] = None) -> Job:
    """The job these (composed) config and overrides describe, with its teacher chain. `recipe_overrides` (default:
    `overrides`) are those its teacher's recipe is composed from."""
    check_added_method_options(cfg, overrides)
    labels = labels_of(cfg)
    recipe_overrides = tuple(overrides if recipe_overrides is None else recipe_overrides)
    teachers = tuple(_teacher_spec(cfg, node, recipe_overrides) for node in teacher_nodes(cfg))
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return Job(config=config, overrides=tuple(overrides), labels=labels, key=config_hash(semantic_config(config)),
               seed=int(cfg.seed), dataset=_typed(DatasetConfig, cfg.dataset, "dataset"),
               optim=_typed(OptimConfig, cfg.optim, "optim"), schedule=_typed(ScheduleConfig, cfg.schedule, "schedule"),
               trainer=_typed(TrainerConfig, cfg.trainer, "trainer"), student=ModelSpec.of(cfg.student),
               method=_options(cfg.method), teacher=teachers[0] if teachers else None,
               teacher_store=Path(str(cfg.paths.teacher_store)),
               logger=_options(cfg.logger) if cfg.get("logger") else Options({"name": "none"}),
               recipe_overrides=recipe_overrides, teachers=teachers, student_init=_student_init(cfg))


def _student_init(cfg: DictConfig) -> Optional[Path]:
    """student.init as a path, checked before anything is trained (a typo must not cost a teacher's training)."""
    init = cfg.student.get("init")
    if not init:
        return None
    path = Path(str(init)).expanduser()
    if not path.is_file():
        raise InvalidSetting(f"student.init={init}: no such file; give the weights file the student starts from (a "
                             f"kdbench run's checkpoint.pt or a state dict), or drop student.init")
    return path


def _teacher_spec(cfg: DictConfig, node: DictConfig, recipe_overrides: tuple[str, ...]) -> TeacherSpec:
    model = ModelSpec.of(node)
    if node.checkpoint:
        return TeacherSpec(model, Path(str(node.checkpoint)).expanduser())
    if node.get("weights"):
        if not model.name.startswith("tv_"):
            raise InvalidSetting(f"teacher.weights={node.weights} names torchvision weights, which only the tv_* "
                                 f"models take (teacher={model.name}); use teacher.checkpoint=<file>")
        return TeacherSpec(model, None, pretrained=str(node.weights))
    tcfg, trecipe, trecord = teacher_config(cfg, recipe_overrides, node)
    tjob = resolve(tcfg, trecord, trecipe)
    recipe = OmegaConf.to_container(node.recipe, resolve=True) if node.get("recipe") else {}
    return TeacherSpec(model, None, f"{model.label}-{tjob.key}", tjob, tuple(f"{k}={v}" for k, v in _leaves(recipe).items()))


def _leaves(tree: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 0.01}} and {"optim.lr": 0.01} both -> {"optim.lr": 0.01}: recipe entries override leaves."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@lru_cache(maxsize=64)
def _recipe(overrides: tuple[str, ...]) -> DictConfig:
    return compose(overrides)


def teacher_config(cfg: DictConfig, overrides: Sequence[str] = (), node: Optional[DictConfig] = None
                   ) -> tuple[DictConfig, tuple, tuple]:
    """(config, recipe overrides, record overrides) of the job that trains `cfg`'s teacher (`node`: another entry
    of `teachers`) into the store: the job's config with the recipe (optim, schedule, trainer) composed without the
    student-only overrides, the teacher's model as the student, its seed, vanilla CE or its `distill` method, then
    its recipe leaves."""
    node = cfg.teacher if node is None else node
    teacher_side = tuple(o for o in overrides if not (_covers(STUDENT_SIDE, override_key(o))
                                                      and is_semantic(override_key(o)))
                         and not override_key(o).startswith("hydra.") and not o.startswith("("))
    recipe = _recipe(teacher_side)
    leaves = _leaves(OmegaConf.to_container(node.recipe, resolve=True)) if node.get("recipe") else {}
    distill = node.get("distill")
    tcfg = copy.deepcopy(cfg)
    with open_dict(tcfg):
        for group in ("optim", "schedule"):
            tcfg[group] = copy.deepcopy(recipe[group])
        for key, value in recipe.trainer.items():
            if is_semantic(f"trainer.{key}"):  # where the run runs (device, progress, ...) stays the run's
                tcfg.trainer[key] = value
        tcfg.student = {"model": node.model, "label": node.label}
        tcfg.teachers = {}
        if distill:
            if not distill.get("from") or not distill.get("method"):
                raise KDBenchError(f"teacher '{node.label}': teacher.distill needs both 'from' (a teacher "
                                   f"config) and 'method' (a method config)")
            tcfg.teacher = copy.deepcopy(distill["from"])
            tcfg.method = copy.deepcopy(distill.method)
        else:
            tcfg.method = {"name": "vanilla", "weights": {"ce": 1.0}}
            tcfg.teacher = copy.deepcopy(node)
            tcfg.teacher.recipe = {}  # applied below; two recipes that make the same job store one teacher
        tcfg.seed = node.seed
        tcfg.logger = {"name": "none"}
        for key, value in leaves.items():
            OmegaConf.update(tcfg, key, value, merge=False)
    record = (TEACHER_RECORD_MARK, *(o for o in teacher_side if not _covers(NOT_IN_TEACHER_RECORD, override_key(o))))
    return tcfg, teacher_side, record


# ----------------------------------------------------------------------------- running


def run(job: Job, out_dir: Path) -> dict:
    """Train one job and keep its record current in out_dir/metrics.json; returns the record. Re-raises any
    failure after recording it. In a folder that already holds this job's completed record (a sweep launched again
    to finish its stragglers), nothing is trained and the record is returned as it is; a folder that holds a run of
    another configuration is refused (resuming it would mix two configurations' epochs)."""
    kept = finished_record(job, out_dir)
    return kept if kept is not None else train_job(job, out_dir)[0]


def finished_record(job: Job, out_dir: Path) -> Optional[dict]:
    """The job's completed record when out_dir holds one (it is kept, not retrained); ConfigChanged when out_dir holds
    a run of another configuration."""
    out_dir = Path(out_dir)
    if not job.trainer.resume:
        return None
    kept = read_record(out_dir / RECORD_FILE)
    if kept is None:
        return None
    refuse_other_configuration(kept.get("config_hash"), job, out_dir)
    if kept.get("status") == "completed" and kept.get("epochs_done") == job.trainer.epochs:
        print(f"kdbench: {out_dir} already holds this job's completed record; kept as it is", flush=True)
        return kept
    return None


def refuse_other_configuration(found: Optional[str], job: Job, out_dir: Path) -> None:
    if found and found != job.key:
        raise ConfigChanged(f"{out_dir} holds a run of another configuration (config hash {found}; this job's is "
                            f"{job.key}), so its epochs ran with other settings; start fresh there with "
                            f"trainer.resume=false, or run the job in another directory")


def train_job(job: Job, out_dir: Path) -> tuple[dict, TapModel]:
    """Train a job in out_dir (its record current all along); returns the record and the trained student. In a
    distributed job every rank trains; only the first writes files, and a rank's failure is the job's error."""
    out_dir = Path(out_dir)
    w = distributed.world()
    record = start_record(job, out_dir, w)
    logger = None
    try:
        logger = job_logger(job, out_dir, w)
        student = _train(job, out_dir, record, logger, w)
        record.complete()
    except BaseException as err:
        with signals_deferred():  # torchrun's SIGTERM to the other ranks must not cut these writes short
            if not w.main and not isinstance(err, KeyboardInterrupt):
                write_json(out_dir / f"failed_rank{w.rank}.json",
                           {"rank_error": f"rank {w.rank}: {type(err).__name__}: {err}",
                            "traceback": "".join(format_exception(err))[-4000:]})
            record.fail(err)
        raise
    finally:
        if logger is not None:
            logger.finish(record.data["status"])
    return record.data, student


def start_record(job: Job, out_dir: Path, w: distributed.World = distributed.SINGLE) -> RunRecord:
    record = RunRecord.start(Path(out_dir), config=job.config, config_hash=job.key, labels=job.labels, seed=job.seed,
                             overrides=list(job.overrides), writes=w.main)
    if w.distributed:
        record.update(world_size=w.size)
    return record


def job_logger(job: Job, out_dir: Path, w: distributed.World = distributed.SINGLE):
    return create_logger(job.logger if w.main else Options({"name": "none"}), Path(out_dir), job.labels, job.config)


def _pair(job: Job, student: TapModel, teachers: Sequence[TapModel], input_shape, num_classes: int,
          train_labels: torch.Tensor, w: distributed.World = distributed.SINGLE) -> PairInfo:
    shapes = [probe_taps(t, input_shape) for t in teachers]
    return PairInfo(student, teachers[0] if teachers else None, probe_taps(student, input_shape),
                    shapes[0] if shapes else None, job.student.label, job.labels["teacher"], num_classes, train_labels,
                    job.trainer.epochs, job.optim.lr, tuple(input_shape), tuple(job.dataset.mean),
                    tuple(job.dataset.std), job.seed, tuple(teachers), tuple(shapes), w)


def check_pair(job: Job) -> None:
    """Build the method on untrained models of the job's pair (no data, the global RNG untouched), so that a pair
    the method cannot serve (IncompatibleModels) is refused before any teacher is trained."""
    shape, classes = tuple(job.dataset.image_shape), int(job.dataset.num_classes)
    with torch.random.fork_rng(devices=[]):
        teachers = [spec.model.build(classes, shape) for spec in job.teachers]
        create_method(job.method, _pair(job, job.student.build(classes, shape), teachers, shape, classes,
                                        torch.arange(2 * classes) % classes))


def _train(job: Job, out_dir: Path, record: RunRecord, logger, w: distributed.World) -> TapModel:
    check_pair(job)
    device, data = prepare(job, w)
    teachers = obtain_teachers(job, data, device, w)
    trainee = Trainee(job, out_dir, record, logger, w, data, device, teachers)
    trainee.attach(trainee.own_teacher_outputs())
    trainee.run_stages()
    m = trainee.member()
    fit(m.run, range(m.start, job.trainer.epochs + 1), m.lr_at, m.evaluation, m.callbacks, total=job.trainer.epochs,
        progress=m.name if job.trainer.progress else None)
    return trainee.student


def prepare(job: Job, w: distributed.World = distributed.SINGLE) -> tuple[torch.device, Data]:
    """The job's device (and process group) and its data."""
    tr = job.trainer
    configure_determinism(tr.deterministic)
    device = resolve_device(tr.device, w.local_rank)
    distributed.init(w, device)
    if w.distributed and tr.batch_size % w.size:
        raise InvalidSetting(f"trainer.batch_size={tr.batch_size} (the global batch) must be a multiple of the "
                             f"{w.size} processes")
    return device, prepare_data(job.dataset, tr, device, w)


@dataclass
class ObtainedTeachers:
    """A job's teachers, ready (eval mode, on the device), with their provenance and test top-1 for the record."""

    models: list
    sources: list
    tops: list

    def record_into(self, record: RunRecord) -> None:
        if self.models:
            record.update(teacher_source=self.sources[0], teacher_top1=self.tops[0])
            if len(self.models) > 1:
                record.update(teacher_sources=self.sources, teachers_top1=self.tops)


def obtain_teachers(job: Job, data: Data, device: torch.device,
                    w: distributed.World = distributed.SINGLE) -> ObtainedTeachers:
    got = ObtainedTeachers([], [], [])
    for spec in job.teachers:
        teacher, source = obtain_teacher(spec, job.teacher_store, data, device, w)
        if job.trainer.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        got.models.append(teacher)
        got.sources.append(source)
        got.tops.append(evaluate(teacher, data.test_loader, job.trainer.precision).top1)
    return got


def sync_batchnorm(student: TapModel, enabled: bool, w: distributed.World, device: torch.device) -> TapModel:
    """With trainer.sync_bn in a distributed job, the student's BatchNorm layers normalise by the statistics of the
    global batch (torch.nn.SyncBatchNorm), as one process with the whole batch would; otherwise each rank normalises
    by its own shard, as DistributedDataParallel does by default. SyncBatchNorm runs on GPUs only."""
    if not enabled or not w.distributed:
        return student
    if device.type != "cuda":
        raise InvalidSetting(f"trainer.sync_bn=true needs GPUs (torch's SyncBatchNorm has no {device.type} kernel); "
                             f"set trainer.sync_bn=false")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)


def teacher_view_cache(job: Job, method, data: Data, device: torch.device, teacher: TapModel, source: dict,
                       w: distributed.World = distributed.SINGLE) -> tuple[Optional[viewcache.ViewCache], dict]:
    """The teacher's view cache for this job (found in the store, built now, or none) and what the record says
    about it. `method` is what reads the outputs: a Method, or a cohort's union of its members' needs."""
    tr = job.trainer
    reason = viewcache.applies(method, data.train_loader)
    if reason is not None:
        return None, {"state": "not used", "why": reason}
    spec = viewcache.spec_for(source["sha256"], job.dataset, tr.precision, len(data.train))
    if source["kind"] == "store":
        entry_dir = Path(source["path"]).parent
    else:  # a checkpoint or pretrained teacher: keyed by its sha256 in a hidden folder of the store
        entry_dir = job.teacher_store / viewcache.HIDDEN_DIR / f"{teacher_label(source)}-{source['sha256'][:16]}"
    mode = str(getattr(tr.teacher_view_cache, "value", tr.teacher_view_cache))
    found = viewcache.ViewCache.open(entry_dir, spec) if mode != "off" else None
    action, why = viewcache.decide(mode, spec, tr.epochs, tr.teacher_view_cache_gb, found is not None)
    if action == "build" and w.distributed:
        action, why = "skip", "a distributed job uses a view cache built beforehand by one process (none found)"
    say = print if w.main else (lambda *a, **k: None)
    say(f"kdbench: teacher view cache: {why}", flush=True)
    cache = found
    if action == "build":
        store = TeacherStore(job.teacher_store)
        with store.lock(StoreEntry(entry_dir)):  # parallel jobs build it once
            cache = viewcache.ViewCache.open(entry_dir, spec) or viewcache.build(
                entry_dir, spec, teacher, data.train_loader, lambda: autocast(device, tr.precision), say)
    state = {"use": "found", "build": "built", "skip": "skipped"}[action]
    info = {"state": state, "why": why, "bytes": spec.nbytes, "views": spec.views}
    if cache is not None:
        info["path"] = str(cache.path)
    return cache, info


def teacher_label(source: dict) -> str:
    return Path(str(source.get("path") or source.get("weights") or "teacher")).stem


class Trainee:
    """One job's training: its student and method (built from the job's seed), teacher outputs, optimizer, record,
    checkpoint and history. Alone, kdbench.train.fit runs its member(); in a cohort (kdbench.cohort) several members
    share batches and teacher forwards in kdbench.train.fit_cohort."""

    def __init__(self, job: Job, out_dir: Path, record: RunRecord, logger, w: distributed.World, data: Data,
                 device: torch.device, teachers: ObtainedTeachers):
        self.job, self.out_dir, self.record, self.logger, self.w, self.data = job, Path(out_dir), record, logger, w, data
        self.device = device
        record.update(device=str(device), n_train=len(data.train), n_test=len(data.test))
        teachers.record_into(record)
        tr = job.trainer
        torch.manual_seed(job.seed)
        student = job.student.build(data.num_classes, data.input_shape)
        if job.student_init is not None:  # after the seeded build, so the method's own modules draw the same numbers
            if w.main:
                print(f"kdbench: student {job.student.label}: starting from {job.student_init}", flush=True)
            load_reference_checkpoint(student, load_torch(job.student_init, "student.init", allow_pickle=True),
                                      str(job.student_init), job.student.name)
            record.update(student_init={"path": str(job.student_init), "sha256": sha256_file(job.student_init)})
        self.student = sync_batchnorm(student, tr.sync_bn, w, device).to(device)
        if tr.channels_last:  # NHWC activations: oneDNN's and cuDNN's faster convolution layouts
            self.student = self.student.to(memory_format=torch.channels_last)
        self.pair = _pair(job, self.student, teachers.models, data.input_shape, data.num_classes, data.train.labels, w)
        self.method = create_method(job.method, self.pair).to(device)
        if w.distributed:  # every rank starts from rank 0's weights (the seeds agree; this makes it certain)
            for tensor in chain(self.student.state_dict().values(), self.method.state_dict().values()):
                torch.distributed.broadcast(tensor, src=0)
        self.teachers = teachers.models
        self.sources = teachers.sources
        self.outputs: list[TeacherOutputs] = []
        self.state: Optional[dict] = None
        self.stages_done: list[str] = []

    @property
    def name(self) -> str:
        return f"{self.record.data['method']} {self.record.data['student']} s{self.job.seed}"

    def own_teacher_outputs(self) -> list[TeacherOutputs]:
        """One live TeacherOutputs per teacher, with a per-sample cache when that is exact and fits, or the view
        cache from the store (kdbench.viewcache) when the method reads only logits of augmented views."""
        tr, method, loader = self.job.trainer, self.method, self.data.train_loader
        outputs = []
        for k, (teacher, shapes) in enumerate(zip(self.teachers, self.pair.teachers_shapes)):
            out = TeacherOutputs(teacher, method.teacher_taps, method.teacher_train_mode)
            exact = cache_is_exact(loader.augmented, method.teacher_train_mode)
            fits = cache_bytes(shapes, method.teacher_taps, len(self.data.train)) <= tr.teacher_cache_gb * 2**30
            if tr.teacher_cache and method.teacher_cache and exact and fits:
                out.build_cache(loader, lambda: autocast(self.device, tr.precision))
            out.view_cache, info = teacher_view_cache(self.job, method, self.data, self.device, teacher,
                                                      self.sources[k], self.w)
            if tr.compile and outputs_are_pure(method):
                out.compile_forward()
            if k == 0:
                self.record.update(teacher_view_cache=info)
            outputs.append(out)
        return outputs

    def attach(self, outputs: Sequence) -> None:
        self.outputs = list(outputs)
        self.record.update(student_params=count_parameters(self.student), extra_params=count_parameters(self.method),
                           teacher_cache=bool(self.outputs) and all(o.cached for o in self.outputs),
                           **self.method.record_fields())

    def _save(self, state: dict) -> None:
        if self.w.main:
            save_torch(self.out_dir / CHECKPOINT_FILE, state)

    def run_stages(self) -> None:
        """Resume from the checkpoint, then the pre-training stages not yet done (each checkpointed)."""
        job, tr, student, method = self.job, self.job.trainer, self.student, self.method
        ckpt_path = self.out_dir / CHECKPOINT_FILE
        self.state = load_torch(ckpt_path, "run checkpoint") if tr.resume and ckpt_path.exists() else None
        if self.state is not None:
            refuse_other_configuration(self.state.get("config_hash"), job, self.out_dir)
            student.load_state_dict(self.state["student"])
            method.load_state_dict(self.state["method"])
        self.stages_done = list(self.state["stages_done"]) if self.state else []
        teacher = self.outputs[0] if self.outputs else None
        for stage in method.stages(student, teacher.model if teacher is not None else None):
            if stage.name in self.stages_done:
                continue
            run = Run(student, StageStep(stage, method), teacher.with_taps(stage.teacher_taps) if teacher else None,
                      self.data.train_loader, constant_sgd_step(stage.parameters, stage.lr, stage.momentum,
                                                                stage.weight_decay, tr.precision, self.w),
                      job.seed + STAGE_SEED_OFFSET, tr.precision)
            fit(run, range(1, stage.epochs + 1), stage.lr_at,
                progress=f"{method.method_name}:{stage.name}" if tr.progress else None)
            self.stages_done.append(stage.name)
            self._save({"epoch": 0, "stages_done": self.stages_done, "student": student.state_dict(),
                        "method": method.state_dict(), "optimizer": None, "history": [], "config_hash": job.key})

    def member(self, on_failure=None) -> Member:
        """The main epochs not yet done: optimizer (resumed), evaluation, and the end-of-epoch record, checkpoint
        and logger."""
        job, tr, student, method, record, w, state = (self.job, self.job.trainer, self.student, self.method,
                                                      self.record, self.w, self.state)
        params = [p for p in chain(student.parameters(), method.trainable_parameters()) if p.requires_grad]
        policy = build_step(params, job.optim, tr.precision, w)
        history: list[dict] = []
        start = 1
        if state is not None and state["epoch"] > 0:
            policy.load_state_dict(state)
            history, start = list(state["history"]), state["epoch"] + 1
            # a finished run launched again keeps its results
            record.update(history=history, last_class_errors=state.get("class_errors"), **summary(history))

        heads = method.extra_heads()
        # each extra head (a peer, an exit, an ensemble) gets a record of its own below heads/<name>: a leaderboard row
        head_records = {name: RunRecord.start(self.out_dir / HEADS_DIR / name, config=job.config, config_hash=job.key,
                                              labels={**job.labels, "method": f"{job.labels['method']}@{name}"},
                                              seed=job.seed, overrides=[*job.overrides, f"(head {name})"],
                                              writes=w.main)
                        for name in heads}
        test_loader = self.data.test_loader

        def evaluation() -> tuple[dict, object]:
            was_training = method.training
            distributed.broadcast_buffers(student, w)  # rank 0's BatchNorm statistics, on every rank
            distributed.broadcast_buffers(method, w)
            method.eval()
            try:
                ev = evaluate(student, test_loader, tr.precision, method.eval_logits)
                fields = {"test_top1": ev.top1, "test_errors": ev.errors, "test_loss": ev.loss}
                if ev.top5 is not None:
                    fields["test_top5"] = ev.top5
                if heads:
                    fields["heads"] = {}
                    for name, logits_of in heads.items():
                        h = evaluate(student, test_loader, tr.precision, logits_of)
                        fields["heads"][name] = {"test_top1": h.top1, "test_errors": h.errors, "test_loss": h.loss}
            finally:
                method.train(was_training)
            return fields, ev

        def end_of_epoch(entry: dict, ev) -> None:
            history.append(entry)
            if tr.keep_every and entry["epoch"] % tr.keep_every == 0 and entry["epoch"] < tr.epochs and w.main:
                (self.out_dir / ANCHORS_DIR).mkdir(parents=True, exist_ok=True)  # a stored teacher's route (RCO)
                save_torch(self.out_dir / ANCHORS_DIR / f"epoch{entry['epoch']}.pt",
                           {"model": student.state_dict(), "epoch": entry["epoch"]})
            self._save({"epoch": entry["epoch"], "stages_done": self.stages_done, "student": student.state_dict(),
                        "method": method.state_dict(), **policy.state_dict(), "history": history,
                        "class_errors": ev.class_errors, "config_hash": job.key})
            # record_fields again: facts a method measures while it trains (weights it chose, draws) reach the record
            record.update(history=history, last_class_errors=ev.class_errors, **summary(history),
                          **method.record_fields())
            for name, head_record in head_records.items():
                head_history = [{"epoch": e["epoch"], **e["heads"][name]} for e in history
                                if name in e.get("heads", {})]
                head_record.update(history=head_history, n_test=record.data.get("n_test"), **summary(head_history))
                if entry["epoch"] == tr.epochs:
                    head_record.complete()
            self.logger.log({"lr": entry["lr"], "test/top1": ev.top1, "test/loss": ev.loss,
                             **{f"train/{k}": v for k, v in entry["train"].items()}}, step=entry["epoch"])

        forward = torch.compile(student.forward_taps) if tr.compile else None
        teacher = self.outputs[0] if self.outputs else None
        run = Run(student, method, teacher, self.data.train_loader, policy, job.seed, tr.precision, forward,
                  tuple(self.outputs))
        return Member(run, lambda epoch: lr_at(epoch, job.optim.lr, job.schedule, tr.epochs), evaluation,
                      [end_of_epoch], start, on_failure or (lambda err: None), self.name)


def obtain_teacher(spec: TeacherSpec, store_root: Path, data: Data, device: torch.device,
                   w: distributed.World = distributed.SINGLE) -> tuple[TapModel, dict]:
    """(frozen teacher in eval mode on `device`, provenance for the run record). Says on the console where the
    teacher comes from before anything is trained. In a distributed job every rank trains a missing teacher
    together; the first rank holds the store's lock and writes the entry."""
    model = spec.model.build(data.num_classes, data.input_shape)
    label = spec.model.label
    say = print if w.main else (lambda *a, **k: None)
    if spec.pretrained is not None:
        path = pretrained_file(spec.model.name, spec.pretrained)
        say(f"kdbench: teacher {label}: torchvision weights {spec.pretrained} from {path}", flush=True)
        model = create_model(spec.model.name, num_classes=data.num_classes, input_shape=data.input_shape,
                             **{**spec.model.kwargs, "weights": spec.pretrained})
        source = {"kind": "pretrained", "weights": spec.pretrained, "path": str(path), "sha256": sha256_file(path)}
        model.kdbench_anchors = []  # pretrained weights keep no training route
    elif spec.checkpoint is not None:
        say(f"kdbench: teacher {label}: loading checkpoint {spec.checkpoint}", flush=True)
        load_reference_checkpoint(model, load_torch(spec.checkpoint, "teacher checkpoint", allow_pickle=True), str(spec.checkpoint),
                                  spec.model.name)
        source = {"kind": "checkpoint", "path": str(spec.checkpoint), "sha256": sha256_file(spec.checkpoint)}
        model.kdbench_anchors = []  # a weights file keeps no training route
    else:
        store = TeacherStore(store_root)
        entry = store.entry(spec.entry)
        how = "trained before"
        if not entry.exists():
            lock = store.lock(entry) if w.main else contextlib.nullcontext()
            with lock:
                missing = distributed.agree(not entry.exists(), w)  # the first rank decides, the others follow
                if not missing:
                    how = "trained just now by another job"
                else:
                    say(f"kdbench: teacher {label}: not in the store, training it now ({describe_training(spec)}) "
                        f"into {entry.directory}", flush=True)
                    _, trained = train_job(spec.job, entry.train_dir)
                    if w.main:
                        kept = {int(p.stem[len("epoch"):]): p for p in (entry.train_dir / ANCHORS_DIR).glob("epoch*.pt")}
                        store.put(entry, trained.state_dict(), spec.job.key, semantic_config(spec.job.config), kept)
                        (entry.train_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
                    distributed.barrier(w)
                    how = ""
        if how:
            say(f"kdbench: teacher {label}: found in the store ({how}): {entry.directory}", flush=True)
        checkpoint, sha = store.load(entry)
        load_reference_checkpoint(model, checkpoint)
        source = {"kind": "store", "path": str(entry.weights), "sha256": sha, "key": spec.job.key}
        # the weights kept during its training (trainer.keep_every), for methods that learn from the teacher's route
        model.kdbench_anchors = [(epoch, str(path), digest) for epoch, path, digest in store.anchors(entry)]
        if spec.job.labels["teacher"] is not None:
            source["distilled_from"] = spec.job.labels["teacher"]
            source["distill_method"] = spec.job.labels["method"]
    model.to(device).eval().requires_grad_(False)
    return model, source


def pretrained_file(model_name: str, weights: str) -> Path:
    """The local file of torchvision's `weights` for a tv_* model; one clear error when it is not in the torch hub
    cache (kdbench never downloads)."""
    import torchvision

    builder = model_name[len("tv_"):]
    try:
        enum = torchvision.models.get_model_weights(builder)[weights]
    except (KeyError, ValueError):
        choices = [w.name for w in torchvision.models.get_model_weights(builder)]
        raise InvalidSetting(f"teacher.weights={weights}: torchvision has no such weights for {builder} "
                             f"(it has: {', '.join(choices)})") from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
    if not path.exists():
        raise KDBenchError(f"torchvision weights {builder} {weights} are not in the torch hub cache ({path}); on a "
                           f"machine with internet run: python -c \"import torchvision; torchvision.models.{builder}"
                           f"(weights='{weights}')\" and copy {Path(enum.url).name} there (TORCH_HOME sets the "
                           f"cache), or pass teacher.checkpoint=<file>")
    return path


def describe_training(spec: TeacherSpec) -> str:
    """'vanilla, 30 epochs, batch 64, sgd lr 0.05, cosine, seed 0' (+ ', teacher.recipe: ...', + ' from X')."""
    job = spec.job
    epochs = job.trainer.epochs
    text = (f"{job.labels['method']}, {epochs} epoch{'s' if epochs != 1 else ''}, batch {job.trainer.batch_size}, {job.optim.name} "
            f"lr {job.optim.lr:g}, {job.schedule.name}, seed {job.seed}")
    if job.labels["teacher"] is not None:
        text += f", from {job.labels['teacher']}"
    if spec.recipe:
        text += f"; teacher.recipe: {' '.join(spec.recipe)}"
    return text


def load_finished(run_dir: Path, device: str | torch.device = "cpu") -> tuple[TapModel, Job]:
    """A finished run's student (its last epoch, in eval mode on `device`) and its job, from the run's directory."""
    import json

    rec = json.loads((Path(run_dir) / RECORD_FILE).read_text())
    ckpt = Path(run_dir) / CHECKPOINT_FILE
    if not ckpt.exists():
        raise KDBenchError(f"{ckpt} is missing: the run's final checkpoint is needed to reload its student")
    cfg = OmegaConf.create(rec["config"])
    job = Job(config=rec["config"], overrides=tuple(rec.get("overrides") or ()), labels={k: rec.get(k) for k in
              ("dataset", "teacher", "student", "method")}, key=rec.get("config_hash", ""), seed=int(rec["seed"]),
              dataset=DatasetConfig(**rec["config"]["dataset"]), optim=OptimConfig(**rec["config"]["optim"]),
              schedule=ScheduleConfig(**rec["config"]["schedule"]), trainer=TrainerConfig(**rec["config"]["trainer"]),
              student=ModelSpec.of(cfg.student), method=_options(cfg.method), teacher=None,
              teacher_store=Path(str(rec["config"]["paths"]["teacher_store"])), logger=Options({"name": "none"}))
    student = job.student.build(job.dataset.num_classes, job.dataset.image_shape)
    student.load_state_dict(load_torch(ckpt, "run checkpoint")["student"])
    return student.to(device).eval(), job
