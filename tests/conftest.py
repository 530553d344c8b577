"""Shared fixtures: compose configs with Hydra's compose API and run jobs in a temp results root."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: tiny test models gain nothing from threads

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

import kdbench.cli  # noqa: F401  (registers schemas and resolvers)
from kdbench.config import CONF_DIR  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data"

# A CIFAR-shaped stand-in that trains in seconds: 10 classes, 64 train / 32 test images, 1 epoch (a stored teacher
# too: the synthetic recipe's 30 epochs are not needed to test wiring).
TINY_SYNTHETIC = ["dataset=synthetic", "dataset.num_classes=10", "dataset.train_size=64", "dataset.test_size=32",
                  "trainer.batch_size=16", "trainer.epochs=1", "trainer.progress=false",
                  "++teacher.recipe.trainer.epochs=1"]


KDBENCH = [sys.executable, "-c", "from kdbench.cli import main; main()"]  # the console script's entry point


def kdbench_cli(tmp_path: Path, *args, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`kdbench <args>` as a user runs it, with results under tmp_path (KDBENCH_RESULTS) and tmp_path as cwd."""
    full_env = {**os.environ, "KDBENCH_RESULTS": str(tmp_path), **(env or {})}
    return subprocess.run([*KDBENCH, *args], capture_output=True, text=True, env=full_env, cwd=tmp_path,
                          timeout=timeout)


def compose_config(overrides=(), tmp_path: Path | None = None, return_hydra_config: bool = False):
    """The job config for `overrides`, as `kdbench` would build it (paths redirected into tmp_path); with
    return_hydra_config, also its `hydra` node (e.g. the sweep's hydra.sweeper.params)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)
    if tmp_path is not None:
        with open_dict(cfg):
            cfg.paths.root = str(tmp_path)
            cfg.paths.teacher_store = str(tmp_path / "teachers")
    return cfg


def resolve_job(overrides=(), tmp_path: Path | None = None, teacher_store: Path | None = None):
    """The resolved kdbench.job.Job of these overrides (paths redirected into tmp_path), as `kdbench` would run it."""
    from kdbench.job import resolve

    cfg = compose_config(overrides, tmp_path)
    if teacher_store is not None:
        with open_dict(cfg):
            cfg.paths.teacher_store = str(teacher_store)
    return resolve(cfg, tuple(overrides))


def _job_runner(tmp_path: Path, teacher_store: Path | None = None):
    from kdbench.job import run

    def _run(*overrides, name="job"):
        return run(resolve_job(overrides, tmp_path, teacher_store), tmp_path / name)

    return _run


@pytest.fixture
def run_job(tmp_path):
    """run_job(*overrides, name="job") -> the record dict of a real training job in tmp_path/name."""
    return _job_runner(tmp_path)


@pytest.fixture(scope="session")
def shared_teacher_store(tmp_path_factory):
    """One teacher store for the whole session. The store is keyed by the teacher's config, so jobs whose teachers
    are configured alike train that teacher once and reuse it."""
    return tmp_path_factory.mktemp("shared_teachers")


@pytest.fixture
def run_job_shared_teachers(tmp_path, shared_teacher_store):
    """run_job, with the session's shared teacher store (for tests that need a trained teacher, not a fresh one)."""
    return _job_runner(tmp_path, shared_teacher_store)


# ----------------------------------------------------------------------------- shared builders
# One definition of the helpers the method tests use (they were copied per file with different argument orders).


def method_config(name: str, *overrides: str):
    """conf/method/<name>.yaml as a job composes it (interpolations resolved against the default config)."""
    return compose_config([f"method={name}", *overrides]).method


def make_pair(teacher: str | None, student: str, num_classes: int = 10, input_shape=(3, 16, 16), n_train: int = 40,
              seed: int = 0, epochs: int = 240, lr: float = 0.05):
    """A PairInfo over freshly built (untrained) models, as the trainer builds it for a method."""
    from kdbench.distill import PairInfo
    from kdbench.models import probe_taps

    torch.manual_seed(seed)
    t = build_model(teacher, num_classes, input_shape) if teacher else None
    s = build_model(student, num_classes, input_shape)
    labels = torch.arange(n_train) % num_classes
    return PairInfo(s, t, probe_taps(s, input_shape), probe_taps(t, input_shape) if t is not None else None,
                    student, teacher, num_classes, labels, epochs, lr, tuple(input_shape))


def build_model(name: str, num_classes: int, input_shape):
    """A fresh registered model."""
    from kdbench.models import create_model

    return create_model(name, num_classes=num_classes, input_shape=input_shape)


@pytest.fixture(scope="module")
def benchmark_pair():
    """The benchmark pair resnet32x4 -> resnet8x4 at 100 classes and 32x32 inputs (built, untrained; one per module)."""
    return make_pair("resnet32x4", "resnet8x4", num_classes=100, input_shape=(3, 32, 32), n_train=200)


@pytest.fixture(scope="module")
def random_teacher_checkpoint(tmp_path_factory):
    """A resnet32x4 teacher checkpoint for the 10-class synthetic data (untrained weights: smoke runs test plumbing)."""
    from kdbench.models import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet32x4.pt"
    torch.save({"model": create_model("resnet32x4", num_classes=10, input_shape=(3, 32, 32)).state_dict()}, path)
    return path


def make_batch(n: int, num_classes: int, input_shape=(3, 16, 16), indices=None, seed: int = 1):
    """A Batch of Gaussian inputs whose targets are index % num_classes."""
    from kdbench.data.loader import Batch

    x = torch.randn(n, *input_shape, generator=torch.Generator().manual_seed(seed))
    idx = torch.arange(n) if indices is None else torch.as_tensor(indices)
    return Batch(x, idx % num_classes, idx, torch.zeros(n, 2, dtype=torch.long), torch.zeros(n, dtype=torch.bool))


# ----------------------------------------------------------------------------- a model whose mode matters


from torch import nn  # noqa: E402

from kdbench.models import TapModel, register_model  # noqa: E402


class ProbeNet(TapModel):
    """A tiny conv net with BatchNorm and dropout, so train and eval mode give different outputs (the zoo's MLPs
    used by most training tests have neither). Every forward appends (tag, training, grad enabled, batch size) to
    ProbeNet.calls: tests read from it which network ran in which mode, and how often."""

    calls: list[tuple[str, bool, bool, int]] = []
    interrupt_at: int | None = None  # raise KeyboardInterrupt (a Ctrl-C) at this forward of the log
    stage_names = ("stage1", "stage2")
    tap_names = ("stem", "stage1_pre", "stage1", "stage2_pre", "stage2", "embedding", "logits")

    def __init__(self, num_classes, input_shape, tag: str = "", width: int = 8, dropout: float = 0.3):
        super().__init__()
        self.tag = tag
        c = input_shape[0]
        self.conv0, self.bn0 = nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * width, num_classes)

    def bn_before_relu(self):
        return [self.bn1, self.bn2]

    def _forward_taps(self, x, taps):
        ProbeNet.calls.append((self.tag, self.training, torch.is_grad_enabled(), x.shape[0]))
        if ProbeNet.interrupt_at is not None and len(ProbeNet.calls) >= ProbeNet.interrupt_at:
            ProbeNet.interrupt_at = None
            raise KeyboardInterrupt("ProbeNet.interrupt_at")
        stem = torch.relu(self.bn0(self.conv0(x)))
        p1 = self.bn1(self.conv1(stem))
        s1 = torch.relu(p1)
        p2 = self.bn2(self.conv2(s1))
        s2 = torch.relu(p2)
        emb = self.drop(s2.mean((2, 3)))
        return {"stem": stem, "stage1_pre": p1, "stage1": s1, "stage2_pre": p2, "stage2": s2, "embedding": emb, "logits": self.fc(emb)}


register_model("probe_net")(ProbeNet)
kdbench.config.register_configs()  # so that teacher=probe_net / student=probe_net compose


@pytest.fixture
def probe_calls():
    """The ProbeNet forward log, emptied before (and the interrupt cleared after) the test."""
    ProbeNet.calls.clear()
    yield ProbeNet.calls
    ProbeNet.interrupt_at = None
