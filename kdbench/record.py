"""The run record: metrics.json in each job's output dir, rewritten atomically after every epoch.

A crash, a NaN or Ctrl-C leaves a record with status failed/interrupted and every epoch finished so far.
"""
from __future__ import annotations

import os
import platform
import socket
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
import torchvision

import kdbench
from kdbench.io import ensure_writable_dir, git_sha, write_json

RECORD_FILE = "metrics.json"


def hardware() -> dict:
    """What a number was measured on: CPU model and threads, and the GPU if one is visible."""
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunRecord:
    def __init__(self, out_dir: Path, data: dict):
        self.path = ensure_writable_dir(Path(out_dir)) / RECORD_FILE
        self.data = data
        self._t0 = time.time()
        self.write()

    @classmethod
    def start(cls, out_dir: Path, *, config: dict, config_hash: str, labels: dict, seed: int, overrides: list[str]) -> "RunRecord":
        return cls(out_dir, {
            "status": "running",
            **labels,
            "seed": seed,
            "overrides": overrides,
            "config_hash": config_hash,
            "history": [],
            "last_top1": None,
            "best_top1": None,
            "best_epoch": None,
            "started_at": _now(),
            "versions": {"kdbench": kdbench.__version__, "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "python": platform.python_version()},
            "git_sha": git_sha(),
            "host": socket.gethostname(),
            "hardware": hardware(),
            "argv": sys.argv,
            "config": config,
        })

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.write()

    def write(self) -> None:
        self.data["wall_time_s"] = round(time.time() - self._t0, 3)
        write_json(self.path, self.data)

    def complete(self) -> None:
        self.update(status="completed", finished_at=_now())

    def fail(self, err: BaseException) -> None:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        self.update(status=status, error=f"{type(err).__name__}: {err}",
                    traceback="".join(traceback.format_exception(err))[-4000:], finished_at=_now())
