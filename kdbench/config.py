"""Typed schemas for the config groups whose keys are fixed (dataset, optim, schedule, trainer).

Each YAML in those groups starts from its schema (`defaults: [_schema, _self_]`), so a misspelt key fails
at composition instead of being silently ignored. Method configs are free-form: each method owns its keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


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
    test_size: Optional[int] = None
    seed: int = 0  # synthetic generation and subset selection
    exclude_train_classes: list[int] = field(default_factory=list)  # e.g. Hinton's "no 3s in the transfer set"


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


@dataclass
class ScheduleConfig:
    name: str = "step"  # step | cosine | constant
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])  # step: lr0*gamma^#{m: epoch > m}
    gamma: float = 0.1
    min_lr: float = 0.0  # cosine floor


@dataclass
class TrainerConfig:
    epochs: int = 240
    batch_size: int = 64
    eval_batch_size: int = 256
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False  # torch.compile the student
    deterministic: bool = False  # torch.use_deterministic_algorithms, cudnn.benchmark off
    data_on_device: bool = True  # keep the dataset on the device; false streams it through a DataLoader
    num_workers: int = 0  # DataLoader workers when data_on_device is false
    resume: bool = True  # continue from checkpoint.pt when the output dir has one
    progress: bool = True  # tqdm bar over epochs
    teacher_cache: bool = True  # compute teacher outputs once per sample when exact (no augmentation, eval teacher)
    teacher_cache_gb: float = 4.0  # ... and when they fit in this much device memory


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(group="dataset", name="_schema", node=DatasetConfig)
    cs.store(group="optim", name="_schema", node=OptimConfig)
    cs.store(group="schedule", name="_schema", node=ScheduleConfig)
    cs.store(group="trainer", name="_schema", node=TrainerConfig)
