"""Shared by the multi-teacher method tests (kd_avg, ae_kd, meal): untrained teacher checkpoints for the 10-class
synthetic data, the `teachers` overrides that name them, and a PairInfo that carries several teachers."""
from __future__ import annotations

import string

import pytest
import torch

from kdbench.distill import PairInfo
from kdbench.models import create_model, probe_taps


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    """checkpoint(arch, seed=0) -> the path of an untrained `arch` checkpoint (10 classes, 3x32x32), made once."""
    root = tmp_path_factory.mktemp("multi_teachers")
    made = {}

    def checkpoint(arch: str, seed: int = 0):
        if (arch, seed) not in made:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = create_model(arch, num_classes=10, input_shape=(3, 32, 32))
            made[arch, seed] = root / f"{arch}-{seed}.pt"
            torch.save({"model": model.state_dict()}, made[arch, seed])
        return made[arch, seed]

    return checkpoint


def teachers_overrides(checkpoint, *archs: str) -> list[str]:
    """`teachers` entries a, b, ... for these architectures, each loading its own untrained checkpoint (seed = its
    position, so two teachers of one architecture differ)."""
    out = []
    for i, arch in enumerate(archs):
        key = string.ascii_lowercase[i]
        out += [f"+teacher@teachers.{key}={arch}", f"teachers.{key}.checkpoint={checkpoint(arch, i)}"]
    return out


def ensemble_pair(teachers, student: str, num_classes: int = 10, input_shape=(3, 16, 16), n_train: int = 40,
                  seed: int = 0, lr: float = 0.05) -> PairInfo:
    """A PairInfo over fresh (untrained) models with several teachers, as the trainer builds it for a
    multi_teacher method (pair.teacher is the first of pair.teachers)."""
    torch.manual_seed(seed)
    built = [create_model(t, num_classes=num_classes, input_shape=input_shape) for t in teachers]
    s = create_model(student, num_classes=num_classes, input_shape=input_shape)
    shapes = [probe_taps(t, input_shape) for t in built]
    return PairInfo(s, built[0], probe_taps(s, input_shape), shapes[0], student, "+".join(teachers), num_classes,
                    torch.arange(n_train) % num_classes, 240, lr, tuple(input_shape), seed=seed,
                    teachers=tuple(built), teachers_shapes=tuple(shapes))


class FakeTeacher:
    """A teacher-outputs callable that returns fixed outputs and counts its calls (what step.teachers holds)."""

    def __init__(self, outputs):
        self.outputs, self.calls = outputs, 0

    def __call__(self, batch):
        self.calls += 1
        return self.outputs
