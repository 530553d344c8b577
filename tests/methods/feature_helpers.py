"""Shared by the tests of the post-2021 feature methods (simkd, semckd, srrl, cat_kd, ickd, srd, itrd, nd): untrained
teacher checkpoints for the 10-class synthetic data and a one-epoch job runner over them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdbench.models import create_model
from tests.conftest import TINY_SYNTHETIC


@pytest.fixture(scope="module")
def teacher_checkpoints(tmp_path_factory):
    """checkpoint(arch) -> path of an untrained `arch` checkpoint for the 10-class synthetic data (built once)."""
    root = tmp_path_factory.mktemp("teachers")
    made: dict[str, Path] = {}

    def checkpoint(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(0)
            made[arch] = root / f"{arch}.pt"
            torch.save({"model": create_model(arch, num_classes=10, input_shape=(3, 32, 32)).state_dict()}, made[arch])
        return made[arch]

    return checkpoint


def one_epoch(run_job, checkpoint, method: str, teacher: str, student: str, *extra: str, name: str = "job"):
    """A one-epoch synthetic CIFAR-shaped job of `method` from an untrained `teacher` checkpoint; the record."""
    return run_job(*TINY_SYNTHETIC, f"teacher={teacher}", f"student={student}", f"method={method}",
                   f"teacher.checkpoint={checkpoint(teacher)}", *extra, name=name)
