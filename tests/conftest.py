"""Shared fixtures: compose configs with Hydra's compose API and run jobs in a temp results root."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: tiny test models gain nothing from threads

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

import kdbench.cli  # noqa: F401  (registers schemas and resolvers)
from kdbench.cli import CONF_DIR  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data"

# A CIFAR-shaped stand-in that trains in seconds: 10 classes, 64 train / 32 test images, 1 epoch.
TINY_SYNTHETIC = ["dataset=synthetic", "dataset.num_classes=10", "dataset.train_size=64", "dataset.test_size=32",
                  "trainer.batch_size=16", "trainer.epochs=1", "trainer.progress=false"]


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


@pytest.fixture
def run_job(tmp_path):
    """run_job(*overrides, name="job") -> the record dict of a real training job in tmp_path/name."""
    from kdbench.train import run

    def _run(*overrides, name="job"):
        cfg = compose_config(overrides, tmp_path)
        return run(cfg, tmp_path / name, tuple(overrides))

    return _run
