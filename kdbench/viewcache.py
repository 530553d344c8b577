"""A view-exact teacher-logit cache, kept in the teacher store beside the teacher.

With crop padding p and horizontal flips, a training image has (2p + 1)^2 x 2 possible views (CIFAR: 9 x 9 x 2 =
162). For a method that reads only the teacher's logits (KD, DKD, DOT and the logit-based baselines), the teacher's
logits of every view of every training image are computed once, written to
`<teacher store>/<teacher entry>/views/<key>.bin` (float32, samples x views x classes) with a `<key>.json` beside it,
and gathered by (sample index, crop offset, flip) at each step instead of a teacher forward. The key covers what the
logits depend on: the teacher's sha256, the training set (data set, subset and seed), the normalisation, the
augmentation and the precision; the file's sha256 is recorded when it is written and checked when it is opened.

Exactness: a view is made by the loader's own augment-and-normalise code (kdbench.data.loader), so the teacher sees
the same input tensor as in a live step. On CPU the teacher's per-sample outputs do not depend on the batch they are
computed in for batches of MIN_EXACT_BATCH samples or more (tests/test_view_cache.py checks a run with the cache
against the live teacher, bit for bit); smaller batches are computed live. On GPUs cuDNN may choose other kernels
for other batch sizes: there the cache equals the live teacher to float rounding.

Cost: building is one teacher forward per view and image, i.e. as many as `views` epochs of live teacher forwards
(CIFAR: 162); a 240-epoch run does 240. `trainer.teacher_view_cache=auto` builds it when the job's own epochs
outnumber the views (so the job itself gains) and uses it whenever it is in the store; `build` builds it for any
job; `off` never uses it. A cache over `trainer.teacher_view_cache_gb` is skipped and the run says so.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from kdbench.errors import CorruptCheckpoint
from kdbench.io import config_hash, sha256_file, write_json
from kdbench.teachers import outputs_are_pure

VIEWS_DIR = "views"
HIDDEN_DIR = ".views"  # <teacher store>/.views/<file>-<sha>/: caches of teachers loaded from a file (not store entries)
MIN_EXACT_BATCH = 4  # smaller batches may take other CPU kernels: computed live
BUILD_CHUNK = 256  # samples per teacher forward while building
MODES = ("auto", "build", "off")


def view_count(crop_padding: int, hflip: bool) -> int:
    return (2 * crop_padding + 1) ** 2 * (2 if hflip else 1)


def view_index(offsets: torch.Tensor, flips: torch.Tensor, crop_padding: int, hflip: bool) -> torch.Tensor:
    """The view number of each sample's (dy, dx) crop offset and flip: (dy * (2p + 1) + dx) * 2 + flip."""
    side = 2 * crop_padding + 1
    index = offsets[:, 0].long() * side + offsets[:, 1].long()
    return index * 2 + flips.long() if hflip else index


def applies(method, loader) -> Optional[str]:
    """Why a view cache cannot serve this method and loader (None: it can)."""
    if set(method.teacher_taps) - {"logits"}:
        return f"method {method.method_name} reads teacher features {sorted(set(method.teacher_taps) - {'logits'})}"
    if not outputs_are_pure(method):
        return f"method {method.method_name} needs the live teacher"
    if not hasattr(loader, "augment") or getattr(loader, "random_resized", False):
        return "the views of this data (random-resized crops) cannot be enumerated"
    if not loader.augment.active:
        return "no augmentation: the per-sample cache (trainer.teacher_cache) is exact already"
    return None


@dataclasses.dataclass(frozen=True)
class ViewCacheSpec:
    """What the cached logits depend on; its hash names the file."""

    teacher_sha256: str
    dataset: dict  # name, classes, the training subset (train_size, samples_per_class, excluded classes, seed)
    mean: tuple
    std: tuple
    crop_padding: int
    hflip: bool
    precision: str
    num_samples: int
    num_classes: int

    @property
    def key(self) -> str:
        return config_hash(dataclasses.asdict(self))

    @property
    def views(self) -> int:
        return view_count(self.crop_padding, self.hflip)

    @property
    def nbytes(self) -> int:
        return 4 * self.num_samples * self.views * self.num_classes


def spec_for(teacher_sha256: str, dataset, precision: str, num_samples: int) -> ViewCacheSpec:
    subset = {k: getattr(dataset, k, None) for k in ("name", "num_classes", "train_size", "samples_per_class",
                                                     "exclude_train_classes", "seed", "image_shape")}
    subset = json.loads(json.dumps(subset, default=str))
    return ViewCacheSpec(teacher_sha256, subset, tuple(float(m) for m in dataset.mean),
                         tuple(float(s) for s in dataset.std), int(dataset.crop_padding), bool(dataset.hflip),
                         str(getattr(precision, "value", precision)), int(num_samples), int(dataset.num_classes))


def paths(entry_dir: Path, spec: ViewCacheSpec) -> tuple[Path, Path]:
    base = Path(entry_dir) / VIEWS_DIR / spec.key
    return base.with_suffix(".bin"), base.with_suffix(".json")


class ViewCache:
    """The cached logits of one teacher over every view of every training sample, memory-mapped from the store."""

    def __init__(self, spec: ViewCacheSpec, data_path: Path):
        self.spec = spec
        self.path = Path(data_path)
        array = np.memmap(self.path, dtype=np.float32, mode="c",
                          shape=(spec.num_samples, spec.views, spec.num_classes))
        self.logits = torch.from_numpy(array)  # copy-on-write view of the mapped file: pages are read when gathered

    @classmethod
    def open(cls, entry_dir: Path, spec: ViewCacheSpec) -> Optional["ViewCache"]:
        """The cache in the store, after checking its recorded sha256; None when it is not there."""
        data_path, meta_path = paths(entry_dir, spec)
        if not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        if not data_path.exists() or sha256_file(data_path) != meta["sha256"]:
            raise CorruptCheckpoint(f"teacher view cache {data_path} is missing or does not match its recorded sha256; "
                                    f"delete {meta_path} and it will be rebuilt")
        return cls(spec, data_path)

    def covers(self, batch) -> bool:
        return len(batch) >= MIN_EXACT_BATCH

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        idx = batch.indices.cpu()
        views = view_index(batch.crop_offsets.cpu(), batch.flips.cpu(), self.spec.crop_padding, self.spec.hflip)
        logits = self.logits[idx, views]  # (N, C) gathered from the mapped file
        return {"logits": logits.to(batch.inputs.device, non_blocking=True)}


@torch.no_grad()
def build(entry_dir: Path, spec: ViewCacheSpec, teacher, loader, autocast, say=print) -> ViewCache:
    """Compute the teacher's logits of every view of every training sample with the loader's own augment and
    normalise (in chunks of BUILD_CHUNK samples per forward, never fewer than MIN_EXACT_BATCH), write them next to the
    teacher with their sha256, and open them."""
    data_path, meta_path = paths(entry_dir, spec)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = data_path.with_name(f".{data_path.name}.partial")
    out = np.memmap(tmp, dtype=np.float32, mode="w+", shape=(spec.num_samples, spec.views, spec.num_classes))
    side, flips = 2 * spec.crop_padding + 1, (2 if spec.hflip else 1)
    teacher.eval()
    n, t0, last = spec.num_samples, time.time(), time.time()
    starts = list(range(0, n, BUILD_CHUNK))
    for k, start in enumerate(starts):
        stop = min(start + BUILD_CHUNK, n)
        lo = min(start, max(0, stop - MIN_EXACT_BATCH))  # a short last chunk is extended backwards to the minimum
        idx = torch.arange(lo, stop)
        raw, targets = loader._raw(idx)
        for v in range(spec.views):
            flip, crop = v % flips, v // flips
            offsets = torch.tensor([[crop // side, crop % side]]).expand(len(idx), 2)
            flip_mask = torch.full((len(idx),), bool(flip))
            batch = loader._finish(raw, targets, idx, offsets, flip_mask)
            with autocast():
                logits = teacher(batch.inputs)
            out[lo:stop, v] = logits.float().cpu().numpy()
        if time.time() - last > 30 or k == len(starts) - 1:
            rate = stop * spec.views / max(time.time() - t0, 1e-9)
            say(f"kdbench: teacher view cache: {stop}/{n} samples x {spec.views} views ({rate:,.0f} views/s)",
                flush=True)
            last = time.time()
    out.flush()
    del out
    tmp.replace(data_path)
    write_json(meta_path, {"key": spec.key, "spec": dataclasses.asdict(spec), "sha256": sha256_file(data_path),
                           "shape": [spec.num_samples, spec.views, spec.num_classes],
                           "build_seconds": round(time.time() - t0, 1)})
    return ViewCache(spec, data_path)


def describe(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def decide(mode: str, spec: ViewCacheSpec, epochs: int, budget_gb: float, found: bool) -> tuple[str, str]:
    """('use' | 'build' | 'skip', why) for a cache of `spec` under trainer.teacher_view_cache=`mode`."""
    size = describe(spec.nbytes)
    if mode == "off":
        return "skip", "trainer.teacher_view_cache=off"
    if spec.nbytes > budget_gb * 2**30:
        return "skip", (f"{size} is over trainer.teacher_view_cache_gb={budget_gb:g}: the live teacher runs instead")
    if found:
        return "use", f"{size}, found in the store"
    if mode == "build" or epochs > spec.views:
        return "build", (f"{size}, built now ({spec.views} teacher forwards per sample, this job alone would run "
                         f"{epochs})")
    return "skip", (f"{size} would cost {spec.views} teacher forwards per sample, more than this job's {epochs} "
                    f"epochs (trainer.teacher_view_cache=build builds it for later jobs)")


def cost_epochs(spec: ViewCacheSpec) -> int:
    """Building costs this many epochs' worth of teacher forwards."""
    return spec.views


__all__ = ["ViewCache", "ViewCacheSpec", "applies", "build", "decide", "spec_for", "view_count", "view_index",
           "MIN_EXACT_BATCH", "MODES", "VIEWS_DIR"]
