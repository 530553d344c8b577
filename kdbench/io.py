"""Atomic file writes, checkpoint loading with clear errors, hashes and provenance."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from kdbench.errors import CorruptCheckpoint, OutputNotWritable


RESULTS_SETTING = "paths.root=<dir> (or KDBENCH_RESULTS)"


def ensure_writable_dir(path: Path, setting: str = RESULTS_SETTING) -> Path:
    """`path`, created if needed, after checking that files can be written there; else one error naming the
    setting that chooses it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe"):
            pass
    except OSError as err:
        raise OutputNotWritable(f"cannot write to {path} ({err.strerror or err}); choose a writable directory "
                                f"with {setting}") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file: shared stores stay readable by colleagues


def _atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder, flushed to disk, then renamed over `path`: a crash (of
    the process or the machine) leaves the old file or the new one, never a partial or empty one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    _atomic(path, lambda f: f.write(json.dumps(data, indent=1, default=str).encode()))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def save_torch(path: Path, obj: Any) -> None:
    _atomic(path, lambda f: torch.save(obj, f))


def load_torch(path: Path, what: str = "checkpoint", allow_pickle: bool = False) -> Any:
    """torch.load with weights_only=True (tensors and plain containers only: loading runs no pickled code) and one
    clear error for missing or unreadable files. kdbench's own files (run checkpoints, stored teachers) always load
    this way. `allow_pickle`: a file the user named (teacher.checkpoint, e.g. a reference repository's checkpoint
    holding numpy scalars) that weights_only refuses is loaded fully after a one-line warning."""
    path = Path(path)
    if not path.is_file():
        raise CorruptCheckpoint(f"{what} {path} does not exist; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not a refused class: a damaged or foreign file
            raise CorruptCheckpoint(f"{what} {path} is unreadable (not a torch checkpoint, or damaged); "
                                    f"delete it (a stored teacher is then retrained) or replace it") from None
        if not allow_pickle:
            raise CorruptCheckpoint(f"{what} {path} holds Python objects beyond tensors and plain containers, which "
                                    f"kdbench does not unpickle (torch.load weights_only=True); re-save its tensors "
                                    f"(e.g. {{'model': state_dict}}) or replace it") from None
        refused = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), "")[:160]
        print(f"kdbench: {what} {path} needs full unpickling (weights_only=True refused it: {refused}); loading it "
              f"as a file you named", file=sys.stderr, flush=True)
    except Exception as err:  # truncated zip, garbage, ...
        raise CorruptCheckpoint(f"{what} {path} is unreadable ({type(err).__name__}: {err}); "
                                f"delete it (a stored teacher is then retrained) or replace it") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CorruptCheckpoint(f"{what} {path} is unreadable ({type(err).__name__}: {err}); "
                                f"delete it (a stored teacher is then retrained) or replace it") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def config_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
