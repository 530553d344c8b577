"""The run record: metrics.json in each job's output dir, rewritten atomically after every epoch.

A crash, a NaN or Ctrl-C leaves a record with status failed/interrupted and every epoch finished so far. A killed
process (kill -9, a machine crash) leaves `running`: readers call effective_status(), which reads such a record as
interrupted once its process is gone. A finished record is never overwritten by a later attempt that fails: while
a completed metrics.json exists, a new attempt writes attempt.json beside it and replaces metrics.json only when it
completes too.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
import torchvision

import kdbench
from kdbench.io import ensure_writable_dir, git_sha, write_json

RECORD_FILE = "metrics.json"
ATTEMPT_FILE = "attempt.json"  # a new attempt's record while a completed one is kept in metrics.json
STALE_AFTER_S = 6 * 3600  # a `running` record of another machine not updated for this long is read as interrupted


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


def read_record(path: Path) -> dict | None:
    """A record file's content, or None when it is missing or is not a readable JSON object."""
    try:
        rec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def effective_status(rec: dict, now: float | None = None) -> str:
    """The record's status, with a `running` record whose process is gone read as `interrupted`: on this machine
    when its pid no longer exists, elsewhere when it has not been updated for STALE_AFTER_S."""
    status = rec.get("status")
    if status != "running":
        return status
    if rec.get("host") == socket.gethostname() and rec.get("pid"):
        return "running" if _process_alive(int(rec["pid"])) else "interrupted"
    updated = rec.get("updated_at") or rec.get("started_at")
    try:
        age = (now or time.time()) - datetime.fromisoformat(updated).timestamp() - (
            0 if rec.get("updated_at") else float(rec.get("wall_time_s") or 0))
    except (TypeError, ValueError):
        return "interrupted"
    return "interrupted" if age > STALE_AFTER_S else "running"


class RunRecord:
    def __init__(self, out_dir: Path, data: dict, writes: bool = True):
        """`writes=False` keeps the record in memory only (the ranks but the first of a distributed job)."""
        self.writes = writes
        out_dir = ensure_writable_dir(Path(out_dir)) if writes else Path(out_dir)
        self.final = out_dir / RECORD_FILE
        kept = read_record(self.final) if writes else None
        # a completed record stays until this attempt completes too
        self.path = out_dir / ATTEMPT_FILE if kept and kept.get("status") == "completed" else self.final
        self.data = data
        self._t0 = time.time()
        self.write()

    @classmethod
    def start(cls, out_dir: Path, *, config: dict, config_hash: str, labels: dict, seed: int, overrides: list[str],
              writes: bool = True) -> "RunRecord":
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
            "pid": os.getpid(),
            "hardware": hardware(),
            "argv": sys.argv,
            "config": config,
        }, writes)

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.write()

    def write(self) -> None:
        self.data["wall_time_s"] = round(time.time() - self._t0, 3)
        self.data["updated_at"] = _now()
        if self.writes:
            write_json(self.path, self.data)

    def complete(self) -> None:
        self.update(status="completed", finished_at=_now())
        if self.writes and self.path != self.final:
            os.replace(self.path, self.final)
            self.path = self.final

    def fail(self, err: BaseException) -> None:
        with signals_deferred():  # a SIGTERM now (torchrun stopping the other ranks) must not cut the record short
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        ranks = sorted(self.final.parent.glob("failed_rank*.json")) if self.writes else []
        if ranks:  # another rank of this distributed job failed first: its error is the job's
            other = read_record(ranks[0]) or {}
            status, err_text = "failed", f"{other.get('rank_error')}"
            self.update(status=status, error=err_text, traceback=other.get("traceback", ""), finished_at=_now())
            return
        try:
            err.kdbench_recorded = True  # the CLI then knows the failure is in a record already
        except AttributeError:
            pass
        self.update(status=status, error=f"{type(err).__name__}: {err}",
                    traceback="".join(traceback.format_exception(err))[-4000:], finished_at=_now())


@contextlib.contextmanager
def signals_deferred():
    """SIGTERM and SIGINT held back while the block runs, then raised again (their handlers run) when it ends:
    writing a failure must finish even when the signal that stops the process arrives meanwhile (torchrun sends
    SIGTERM to the surviving ranks as soon as one fails, while rank 0 is recording that failure). Done with Python
    handlers, not a thread's signal mask: the kernel may hand a process signal to any thread (gloo's, OpenMP's), and
    Python runs its handler in the main thread whatever that thread's mask. Only the main thread can set handlers;
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    # a handler installed outside Python reads as None and could not be put back: such a signal is left alone
    held = [s for s in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(s) is not None]
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])


def record_failure(out_dir: Path, err: BaseException, *, labels: dict | None = None, seed=None, overrides=()) -> None:
    """Keep a failure that happened before the job's own record existed (a bad option, a refused resume), so that
    the sweep counts it: in metrics.json when the folder has no record yet, else in attempt.json beside the one
    there, which is left as it was."""
    out_dir = Path(out_dir)
    data = {"status": "running", **(labels or {}), "seed": seed, "overrides": list(overrides), "history": [],
            "started_at": _now(), "host": socket.gethostname(), "pid": os.getpid(), "argv": sys.argv}
    record = RunRecord.__new__(RunRecord)
    record.writes = True
    record.final = out_dir / RECORD_FILE
    record.path = record.final if not record.final.exists() else out_dir / ATTEMPT_FILE
    record.data, record._t0 = data, time.time()
    ensure_writable_dir(out_dir)
    record.fail(err)
