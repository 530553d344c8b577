"""What the benchmarks share: a job composed from overrides as the CLI composes it, and a teacher checkpoint with
seeded random weights (throughput does not depend on what the weights are)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def job_of(overrides: Sequence[str]):
    from kdbench.api import compose
    from kdbench.job import resolve

    return resolve(compose(overrides), tuple(overrides))


def random_teacher(directory: Path, arch: str = "resnet32x4", classes: int = 100) -> Path:
    """<directory>/<arch>.pt: `arch` for 32x32 inputs with torch.manual_seed(0) weights, in kdbench's format."""
    from kdbench.models import create_model

    torch.manual_seed(0)
    path = Path(directory) / f"{arch}.pt"
    torch.save({"model": create_model(arch, num_classes=classes, input_shape=(3, 32, 32)).state_dict()}, path)
    return path
