"""The config tree's rules in one place: typed schemas for the groups whose keys are fixed, the settings that do
not change a result, the teacher/student options made from the model registry, and composition.

Each YAML in a schema'd group starts from its schema (`defaults: [_schema, _self_]`), so a misspelt key fails at
composition instead of being silently ignored. Method configs are free-form: each method owns its keys.
The `teacher` and `student` groups have no files: every registered model is an option of both (its node holds the
model's name and its keyword defaults, so `student.model.hidden=[64]` works without a `+`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent / "conf"
PRIMARY = "train"


def _check(group: str, **rules) -> None:
    """rules: key=(ok, requirement); raises one InvalidSetting line for the first broken rule."""
    from kdbench.errors import InvalidSetting

    for key, (ok, requirement) in rules.items():
        if not ok:
            raise InvalidSetting(f"{group}.{key} {requirement}")


def _given(*values) -> bool:
    """Whether the dataclass holds real values (not the MISSING / interpolation placeholders of composition)."""
    return not any(isinstance(v, str) and (v == MISSING or v.startswith("${")) for v in values)


@dataclass
class DatasetConfig:
    name: str = MISSING  # digits | mnist | cifar10 | cifar100 | synthetic
    num_classes: int = MISSING
    image_shape: list[int] = MISSING  # (C, H, W)
    mean: list[float] = MISSING  # per-channel normalisation, applied after augmentation
    std: list[float] = MISSING
    root: str = "${paths.data_dir}"
    download: bool = False
    crop_padding: int = 0  # RandomCrop(H, padding) with zero fill; 0 = off
    hflip: bool = False  # RandomHorizontalFlip(0.5)
    train_size: Optional[int] = None  # synthetic: samples to make; real data: seeded random subset
    samples_per_class: Optional[int] = None  # few-shot transfer sets: a seeded subset of this many per class
    test_size: Optional[int] = None
    seed: int = 0  # synthetic generation and subset selection
    exclude_train_classes: list[int] = field(default_factory=list)  # e.g. Hinton's "no 3s in the transfer set"
    eval_resize: Optional[int] = None  # image folders: Resize(eval_resize) + CenterCrop(H) to evaluate (None: H * 8/7)

    def __post_init__(self):
        if not _given(self.num_classes, self.image_shape, self.mean, self.std):
            return
        channels = self.image_shape[0] if len(self.image_shape) == 3 else None
        _check("dataset",
               num_classes=(self.num_classes >= 2, f"must be >= 2, got {self.num_classes}"),
               image_shape=(len(self.image_shape) == 3 and min(self.image_shape) >= 1,
                            f"must be [C, H, W] with positive sizes, got {list(self.image_shape)}"),
               mean=(len(self.mean) == channels, f"needs one value per channel ({channels}), got {list(self.mean)}"),
               std=(len(self.std) == channels and min(self.std) > 0,
                    f"needs one positive value per channel ({channels}), got {list(self.std)}"),
               crop_padding=(self.crop_padding >= 0, f"must be >= 0, got {self.crop_padding}"),
               train_size=(self.train_size is None or self.train_size >= 1, f"must be >= 1, got {self.train_size}"),
               samples_per_class=(self.samples_per_class is None or self.samples_per_class >= 1,
                                  f"must be >= 1 or null, got {self.samples_per_class}"),
               test_size=(self.test_size is None or self.test_size >= 1, f"must be >= 1, got {self.test_size}"),
               exclude_train_classes=(all(0 <= c < self.num_classes for c in self.exclude_train_classes)
                                      and len(set(self.exclude_train_classes)) < self.num_classes,
                                      f"must name classes in 0..{self.num_classes - 1} and keep at least one, got "
                                      f"{list(self.exclude_train_classes)}"))


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | dot
    lr: float = 0.05
    momentum: float = 0.9
    delta: float = 0.075  # dot: momenta momentum -/+ delta for the task / distillation gradients
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_norm: Optional[float] = None  # cap on each unit's incoming-weight L2 norm (Hinton 2012 dropout nets)

    def __post_init__(self):
        _check("optim",
               name=(self.name in ("sgd", "adam", "dot"), f"must be sgd, adam or dot (optim=<name>), got '{self.name}'"),
               lr=(self.lr > 0, f"must be > 0, got {self.lr}"),
               momentum=(0 <= self.momentum < 1, f"must be in [0, 1), got {self.momentum}"),
               delta=(self.delta >= 0 and (self.name != "dot" or self.momentum + self.delta < 1),
                      f"must be >= 0 with momentum + delta < 1, got {self.delta}"),
               weight_decay=(self.weight_decay >= 0, f"must be >= 0, got {self.weight_decay}"),
               betas=(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                      f"must be two values in [0, 1), got {list(self.betas)}"),
               max_norm=(self.max_norm is None or self.max_norm > 0, f"must be > 0 or null, got {self.max_norm}"))


@dataclass
class ScheduleConfig:
    name: str = "step"  # step | cosine | constant
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])  # step: lr0*gamma^#{m: epoch > m}
    gamma: float = 0.1
    min_lr: float = 0.0  # cosine floor

    def __post_init__(self):
        _check("schedule",
               name=(self.name in ("step", "cosine", "constant"),
                     f"must be step, cosine or constant (schedule=<name>), got '{self.name}'"),
               milestones=(all(m >= 0 for m in self.milestones), f"must be epochs >= 0, got {list(self.milestones)}"),
               gamma=(self.gamma > 0, f"must be > 0, got {self.gamma}"),
               min_lr=(self.min_lr >= 0, f"must be >= 0, got {self.min_lr}"))


class Precision(str, Enum):
    """trainer.precision, checked by OmegaConf when the config is composed (a typo fails before any job starts):
    fp32; bf16 autocast; fp16 autocast with a gradient scaler (kdbench.optim.StepPolicy)."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


# trainer.device, checked at composition like the precision: auto, cpu, mps, cuda, cuda:0 ... cuda:15 (an Enum,
# because OmegaConf validates only types and enums; the functional form allows the names with a colon).
Device = Enum("Device", {name: name for name in ("auto", "cpu", "mps", "cuda", *(f"cuda:{i}" for i in range(16)))},
              type=str)
Device.__doc__ = "trainer.device: auto | cpu | mps | cuda | cuda:N (N < 16), checked when the config is composed."


class ViewCacheMode(str, Enum):
    """trainer.teacher_view_cache (kdbench.viewcache): auto = use it when it is in the store, build it when the job's
    epochs outnumber the views; build = build it for any job; off = never."""

    auto = "auto"
    build = "build"
    off = "off"


@dataclass
class TrainerConfig:
    epochs: int = 240
    batch_size: int = 64
    eval_batch_size: int = 256
    device: Device = Device.auto  # auto | cpu | mps | cuda | cuda:N
    precision: Precision = Precision.fp32  # fp32 | bf16 (autocast) | fp16 (autocast + gradient scaler)
    compile: bool = False  # torch.compile the student, and the forward of a frozen eval-mode teacher (with freezing)
    deterministic: bool = False  # torch.use_deterministic_algorithms, cudnn.benchmark off
    data_on_device: bool = True  # keep the dataset on the device; false streams it through a DataLoader
    num_workers: int = 0  # DataLoader workers when data_on_device is false
    resume: bool = True  # continue from checkpoint.pt when the output dir has one
    progress: bool = True  # tqdm bar over epochs
    teacher_cache: bool = True  # compute teacher outputs once per sample when exact (no augmentation, eval teacher)
    teacher_cache_gb: float = 4.0  # ... and when they fit in this much device memory
    sync_bn: bool = False  # distributed jobs on GPUs: the student's BatchNorm statistics over the global batch
    keep_every: int = 0  # > 0: keep the weights after every this many epochs (a stored teacher's anchors; RCO)
    # the teacher's logits of every augmented view, once, in the store (kdbench.viewcache): auto | build | off
    teacher_view_cache: ViewCacheMode = ViewCacheMode.auto
    teacher_view_cache_gb: float = 8.0  # ... when the cache (samples x views x classes x 4 bytes) is at most this
    channels_last: bool = False  # student and teacher in channels-last memory format (faster convolutions on CPUs)

    def __post_init__(self):
        import re

        _check("trainer",
               epochs=(self.epochs >= 1, f"must be >= 1, got {self.epochs}"),
               batch_size=(self.batch_size >= 1, f"must be >= 1, got {self.batch_size}"),
               eval_batch_size=(self.eval_batch_size >= 1, f"must be >= 1, got {self.eval_batch_size}"),
               device=(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", _value(self.device)) is not None,
                       f"must be auto, cpu, mps, cuda or cuda:N, got '{_value(self.device)}'"),
               precision=(_value(self.precision) in ("fp32", "bf16", "fp16"),
                          f"must be fp32, bf16 or fp16, got '{_value(self.precision)}'"),
               num_workers=(self.num_workers >= 0, f"must be >= 0, got {self.num_workers}"),
               teacher_cache_gb=(self.teacher_cache_gb >= 0, f"must be >= 0, got {self.teacher_cache_gb}"),
               keep_every=(self.keep_every >= 0, f"must be >= 0 (0 = off), got {self.keep_every}"),
               teacher_view_cache=(_value(self.teacher_view_cache) in ("auto", "build", "off"),
                                   f"must be auto, build or off, got '{_value(self.teacher_view_cache)}'"),
               teacher_view_cache_gb=(self.teacher_view_cache_gb >= 0,
                                      f"must be >= 0, got {self.teacher_view_cache_gb}"))


def _value(option) -> str:
    """An enum option's value, or the plain string a record or a test passes."""
    return str(option.value if isinstance(option, Enum) else option)


@dataclass
class NetworkConfig:
    model: Dict[str, Any] = MISSING  # {name: <registered model>, **its keyword arguments}
    label: str = MISSING  # the name leaderboards show


@dataclass
class StudentConfig(NetworkConfig):
    # a weights file the student starts from instead of its seeded initialisation: a kdbench run's checkpoint.pt
    # (its student), a RepDistiller/mdistiller checkpoint or a bare state dict. For two-stage protocols (a first
    # stage's student distilled again, e.g. torchdistill's PAD) and fine-tuning; its sha256 goes into the record.
    init: Optional[str] = None


@dataclass
class TeacherConfig(NetworkConfig):
    checkpoint: Optional[str] = None  # a weights file (kdbench or RepDistiller/mdistiller format); null = the store
    weights: Optional[str] = None  # torchvision pretrained weights of a tv_* teacher (e.g. IMAGENET1K_V1), local cache
    seed: int = 0  # the seed the stored teacher is trained with
    recipe: Dict[str, Any] = field(default_factory=dict)  # teacher-only overrides of the recipe, per leaf
    distill: Optional[Dict[str, Any]] = None  # {from: <teacher config>, method: <method config>}: a TA (TAKD)


# ----------------------------------------------------------------------------- the settings that change no result

# Where and how a job runs, never what it computes. The one definition used by the run's config hash, the
# leaderboard's setting column and the teacher-store key (a dotted key covers its subkeys).
NON_SEMANTIC = ("hydra", "paths", "logger", "dry_run", "dry_run_tflops", "dataset.root", "dataset.download",
                "trainer.device", "trainer.progress", "trainer.resume", "trainer.num_workers",
                "trainer.data_on_device", "trainer.eval_batch_size", "trainer.teacher_cache",
                "trainer.teacher_cache_gb", "trainer.keep_every", "trainer.teacher_view_cache",
                "trainer.teacher_view_cache_gb")


def override_key(override: str) -> str:
    """'+trainer.epochs=3' -> 'trainer.epochs'; 'model@teacher.model=x' -> 'teacher.model'."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[1] if "@" in key else key


def is_semantic(key: str) -> bool:
    """Whether a (dotted) config key can change what a run computes."""
    return not any(key == k or key.startswith(k + ".") for k in NON_SEMANTIC)


def semantic_config(config: dict | DictConfig) -> dict:
    """The config without its non-semantic settings: what the run's hash and the store key are made of."""
    data = OmegaConf.to_container(config, resolve=True, enum_to_str=True) if isinstance(config, DictConfig) else dict(config)

    def prune(node: dict, prefix: str) -> dict:
        out = {}
        for key, value in node.items():
            path = f"{prefix}{key}"
            if not is_semantic(path):
                continue
            out[key] = prune(value, path + ".") if isinstance(value, dict) else value
        return out

    return prune(data, "")


def semantic_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that change a result (markers such as '(teacher for the store)' are not overrides)."""
    return [o for o in overrides if not o.startswith("(") and is_semantic(override_key(o))]


# ----------------------------------------------------------------------------- experiment names

# Experiments are named <paper>_<dataset>[_<variant>]. Renamed ones (records keep the name they ran under, and are read
# as the new one) and removed ones, with what replaces them; `kdbench experiment=<old>` names the replacement.
RENAMED_EXPERIMENTS = {"regression_digits": "kdbench_digits_regression"}
REMOVED_EXPERIMENTS = {
    "cifar100_crd": "dataset=cifar100 teacher=resnet32x4 student=resnet8x4 (dataset=cifar100 selects the CIFAR-100 "
                    "recipe, conf/recipe/cifar100.yaml)",
    "takd_plain_cnn_c100": "experiment=takd_cifar100 pair=plain_cnn_10_c100-plain_cnn_4_c100-plain_cnn_2_c100",
}


def current_experiment(name: str) -> str:
    return RENAMED_EXPERIMENTS.get(name, name)


def check_experiment_names(overrides: Sequence[str]) -> None:
    """One clear error for an experiment that was renamed or removed, naming what to use instead."""
    from kdbench.errors import KDBenchError

    for override in overrides:
        if override_key(override) != "experiment":
            continue
        for name in override.split("=", 1)[1].split(","):
            if name in RENAMED_EXPERIMENTS:
                raise KDBenchError(f"experiment '{name}' is now called '{RENAMED_EXPERIMENTS[name]}'; use "
                                   f"experiment={RENAMED_EXPERIMENTS[name]}")
            if name in REMOVED_EXPERIMENTS:
                raise KDBenchError(f"experiment '{name}' was removed; use {REMOVED_EXPERIMENTS[name]}")


# Hydra launchers kdbench ships configs for (conf/hydra/launcher) or documents, and the extra that installs each.
LAUNCHER_EXTRAS = {"slurm_gpu": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
                   "slurm_local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
                   "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
                   "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
                   "joblib": ("hydra_plugins.hydra_joblib_launcher", "joblib")}


def check_launcher(overrides: Sequence[str]) -> None:
    """One clear error when hydra/launcher names a launcher whose Hydra plugin is not installed."""
    import importlib.util

    from kdbench.errors import KDBenchError

    for override in overrides:
        if override_key(override) != "hydra/launcher":
            continue
        choice = override.split("=", 1)[1]
        module, extra = LAUNCHER_EXTRAS.get(choice, (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            raise KDBenchError(f"hydra/launcher={choice} needs its Hydra plugin ({module.split('.')[-1]}); install "
                               f"it with: pip install 'kdbench[{extra}]'")


# ----------------------------------------------------------------------------- registration and composition


def _model_node(name: str, factory) -> dict:
    """{name, **keyword defaults} of a registered model factory (its metadata, as timm keeps it beside the model)."""
    node: dict = {"name": name}
    for param in list(inspect.signature(factory).parameters.values())[2:]:
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL) or param.default is inspect.Parameter.empty:
            continue
        node[param.name] = list(param.default) if isinstance(param.default, tuple) else param.default
    return node


def register_configs() -> None:
    """Schemas of the fixed-key groups, and one teacher and one student option per registered model."""
    from kdbench.models import MODELS, list_models

    cs = ConfigStore.instance()
    for group, node in (("optim", OptimConfig), ("schedule", ScheduleConfig), ("trainer", TrainerConfig)):
        cs.store(group=group, name="_schema", node=node)
    cs.store(group="schema", name="dataset", node=DatasetConfig)  # dataset files are _global_ (they pick a recipe)
    for name in list_models():
        model = _model_node(name, MODELS.get(name))
        cs.store(group="student", name=name, node=StudentConfig(model=model, label=name))
        cs.store(group="teacher", name=name, node=TeacherConfig(model=model, label=name))


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The job config kdbench composes for these overrides: through the running Hydra app when there is one (so
    its search path counts), else from the packaged config tree."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(PRIMARY, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(PRIMARY, overrides=list(overrides))
