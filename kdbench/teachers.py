"""Teachers at run time: the content-addressed store, and the teacher-outputs object the training loop reads.

The store: `<teacher_store>/<label>-<key>/` holds `teacher.pt` (the weights), `meta.json` (key, sha256, the config
that trained it) and `train/` (that job's record). The key is the hash of the semantic config of the job that
trains the teacher (kdbench.job builds it), so architecture, data, recipe and seed all count. The sha256 of the
weights is recorded at save time and verified at every load; a file lock makes parallel jobs train a shared
teacher once and wait for it.

TeacherOutputs: what a method sees of the teacher for a batch, either one live forward (no gradients, in the mode
the method declares) or a gather from outputs computed once per training sample, when that is exact.
"""
from __future__ import annotations

import fcntl
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from kdbench.errors import CorruptCheckpoint
from kdbench.io import ensure_writable_dir, load_torch, save_torch, sha256_file, write_json
from kdbench.models import TapModel

STORE_SETTING = "paths.teacher_store=<dir>"
WEIGHTS_FILE = "teacher.pt"
META_FILE = "meta.json"
TRAIN_DIR = "train"
ANCHORS_DIR = "anchors"  # weights kept during the teacher's training (trainer.keep_every): anchors/epoch<E>.pt


@dataclass(frozen=True)
class StoreEntry:
    directory: Path

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def weights(self) -> Path:
        return self.directory / WEIGHTS_FILE

    @property
    def meta(self) -> Path:
        return self.directory / META_FILE

    @property
    def train_dir(self) -> Path:
        return self.directory / TRAIN_DIR

    @property
    def anchors_dir(self) -> Path:
        return self.directory / ANCHORS_DIR

    def exists(self) -> bool:
        """Whether the entry is complete (its meta.json is written last)."""
        return self.meta.exists()


class TeacherStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def entry(self, name: str) -> StoreEntry:
        return StoreEntry(self.root / name)

    @contextmanager
    def lock(self, entry: StoreEntry) -> Iterator[None]:
        """Hold the entry's lock (to train it): parallel jobs that need one teacher train it once. Reading a
        complete entry needs no lock, nor write access."""
        ensure_writable_dir(entry.directory, STORE_SETTING)
        with open(entry.directory / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def put(self, entry: StoreEntry, state_dict: dict, key: str, config: dict, anchors: dict | None = None) -> None:
        """Store the weights (and the anchors kept during training: {epoch: file}, moved into the entry's anchors/,
        listed in meta.json with their sha256); meta.json is written last."""
        save_torch(entry.weights, {"model": state_dict})
        kept = {}
        for epoch, path in sorted((anchors or {}).items()):
            target = entry.anchors_dir / f"epoch{int(epoch)}.pt"
            target.parent.mkdir(parents=True, exist_ok=True)
            Path(path).replace(target)
            kept[str(int(epoch))] = {"file": f"{ANCHORS_DIR}/{target.name}", "sha256": sha256_file(target)}
        meta = {"key": key, "sha256": sha256_file(entry.weights), "config": config,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if kept:
            meta["anchors"] = kept
        write_json(entry.meta, meta)

    def anchors(self, entry: StoreEntry) -> list[tuple[int, Path, str]]:
        """(epoch, weights file, recorded sha256) of the entry's anchors, by epoch ([] when it kept none)."""
        meta = json.loads(entry.meta.read_text())
        return sorted((int(e), entry.directory / a["file"], a["sha256"]) for e, a in (meta.get("anchors") or {}).items())

    def load(self, entry: StoreEntry) -> tuple[dict, str]:
        """(the stored checkpoint, its sha256) after checking the file against the recorded sha256."""
        meta = json.loads(entry.meta.read_text())
        if not entry.weights.exists() or sha256_file(entry.weights) != meta["sha256"]:
            raise CorruptCheckpoint(f"stored teacher {entry.weights} is missing or does not match its recorded sha256; "
                                    f"delete {entry.directory} and it will be retrained")
        return load_torch(entry.weights, "stored teacher"), meta["sha256"]


# ----------------------------------------------------------------------------- the outputs the loop reads


def cache_is_exact(augmented: bool, train_mode: bool) -> bool:
    """Whether one teacher forward per sample gives every step's outputs exactly: only when a sample's input never
    changes (no random augmentation) and the teacher's forward does not depend on the batch (eval mode)."""
    return not augmented and not train_mode


def outputs_are_pure(method) -> bool:
    """Whether a method's teacher outputs are a function of the loader's batch alone: the teacher in eval mode, and
    called on the batches the loader draws (not on views of the method's own). Then they may be cached, or computed
    by a forward with the teacher's weights frozen in (TeacherOutputs.compile_forward)."""
    return bool(method.teacher_cache) and not method.teacher_train_mode


def cache_bytes(shapes: dict[str, tuple[int, ...]], taps, num_samples: int) -> int:
    """fp32 bytes of the cached outputs (the taps and the logits) for every training sample."""
    return 4 * num_samples * sum(math.prod(shapes[t]) for t in {*taps, "logits"})


class TeacherOutputs:
    """The teacher's outputs (`taps` and the logits) for a batch: a live forward under no_grad in `train_mode`,
    or, after build_cache(), a gather by batch.indices from outputs computed once per sample."""

    def __init__(self, model: TapModel, taps, train_mode: bool):
        self.model = model
        self.taps = tuple(taps)
        self.train_mode = train_mode
        self.cache: Optional[dict[str, torch.Tensor]] = None
        self.view_cache = None  # kdbench.viewcache.ViewCache: the logits of every augmented view, from the store
        self.compiled: Optional[Callable] = None  # the forward torch.compile'd with freezing (compile_forward)

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def with_taps(self, taps) -> "TeacherOutputs":
        """Live outputs of other taps in the same mode (a method's pre-training stage)."""
        return TeacherOutputs(self.model, taps, self.train_mode)

    def start_epoch(self) -> None:
        self.model.train(self.train_mode)

    def build_cache(self, loader, autocast) -> None:
        """Compute every training sample's outputs once (loader order and augmentation do not matter: exact only
        without augmentation, see cache_is_exact)."""
        self.model.eval()
        outputs: dict[str, torch.Tensor] = {}
        for batch in loader.unsharded().epoch(0):
            with autocast():
                out = self._forward(batch.inputs)
            for name in (*self.taps, "logits"):
                if name not in outputs:
                    outputs[name] = out[name].new_empty(loader.num_samples, *out[name].shape[1:])
                outputs[name][batch.indices] = out[name]
        self.cache = outputs

    def compile_forward(self) -> None:
        """torch.compile the live forward with inductor's `freezing`: the weights become constants, so BatchNorm is
        folded into the convolutions and weights are prepacked (outputs
        equal to float rounding). Only for a teacher that nothing changes (eval mode, frozen: the condition under
        which its outputs may be cached at all), which freezing assumes."""
        if self.train_mode:
            raise ValueError("a teacher in train mode cannot be compiled with frozen weights")
        self.compiled = torch.compile(self.model.forward_taps, options={"freezing": True})

    def _forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return (self.compiled or self.model.forward_taps)(inputs, self.taps)

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        if self.cache is not None:
            return {name: value[batch.indices] for name, value in self.cache.items()}
        if self.view_cache is not None and self.view_cache.covers(batch):
            return self.view_cache(batch)
        return self._forward(batch.inputs)


# ----------------------------------------------------------------------------- what the store holds (kdbench teachers)


@dataclass
class StoredTeacher:
    """One folder of the store as `kdbench teachers` shows it."""

    entry: StoreEntry
    meta: Optional[dict]  # None: half-written (training died, or is running now) or not a store entry
    record: Optional[dict]  # the training job's record (train/metrics.json), when readable
    size: int  # bytes of the whole folder

    @property
    def complete(self) -> bool:
        return self.meta is not None


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def scan_store(root: Path) -> list[StoredTeacher]:
    """Every entry folder below the store root, complete or not, by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        entry = StoreEntry(directory)
        size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        out.append(StoredTeacher(entry, _read_json(entry.meta) if entry.exists() else None,
                                 _read_json(entry.train_dir / "metrics.json"), size))
    return out


def verify_entry(entry: StoreEntry) -> tuple[bool, str]:
    """(ok, what was found): the weights' sha256 against the one recorded in meta.json."""
    meta = _read_json(entry.meta)
    if meta is None:
        return False, "incomplete: no readable meta.json (training died or is running)"
    if not entry.weights.exists():
        return False, f"missing {WEIGHTS_FILE}"
    sha = sha256_file(entry.weights)
    if sha != meta.get("sha256"):
        return False, f"sha256 mismatch: file {sha[:12]}…, recorded {str(meta.get('sha256'))[:12]}…"
    return True, f"sha256 ok ({sha[:12]}…)"


def is_locked(entry: StoreEntry) -> bool:
    """Whether a job holds the entry's lock now (it is being trained)."""
    lock = entry.directory / ".lock"
    if not lock.exists():
        return False
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def store_users(entries: list[StoredTeacher], record_roots) -> dict[str, list[Path]]:
    """{entry name: the run folders whose records name it as their teacher (teacher_source, teacher_sources)},
    from every metrics.json below `record_roots` (the store itself included: a TA's training used its teacher)."""
    names = {t.entry.name for t in entries}
    users: dict[str, list[Path]] = {name: [] for name in names}
    seen = set()
    for root in map(Path, record_roots):
        if not root.is_dir():
            continue
        for path in root.rglob("metrics.json"):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            rec = _read_json(path)
            if rec is None:
                continue
            sources = [rec.get("teacher_source") or {}, *(rec.get("teacher_sources") or [])]
            for source in sources:
                if isinstance(source, dict) and source.get("kind") == "store" and source.get("path"):
                    name = Path(source["path"]).parent.name
                    if name in users and path.parent not in users[name]:
                        users[name].append(path.parent)
    return users
