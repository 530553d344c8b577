"""Batches with replayable augmentation, from a split held on the training device or streamed to it.

Each Batch carries its dataset indices and augmentation parameters (crop offsets, flips), so an exact
teacher-output cache can key on them. Both loaders draw the order and the parameters from one seeded CPU
generator per epoch, so they produce identical batches, and a resumed run sees the same data it would have.
In a distributed job (kdbench.distributed) the plan is the same on every rank and each rank takes every world-th
sample of each global batch: the union of the ranks' batches is the single-process batch.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from kdbench.data.datasets import Split
from kdbench.distributed import SINGLE, World


@dataclass
class Batch:
    inputs: torch.Tensor  # normalised, augmented (N, C, H, W) float
    targets: torch.Tensor  # (N,) int64
    indices: torch.Tensor  # (N,) dataset indices
    crop_offsets: torch.Tensor  # (N, 2) (dy, dx) into the padded image; all `padding` when not cropping
    flips: torch.Tensor  # (N,) bool
    share: float = 1.0  # this rank's part of the global batch (1 in a single process)

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(frozen=True)
class Augment:
    """RandomCrop(size, padding, zero fill) + RandomHorizontalFlip(0.5), as torchvision applies them before Normalize."""

    crop_padding: int = 0
    hflip: bool = False

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.hflip

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5 if self.hflip else torch.zeros(n, dtype=torch.bool)
        return offsets, flips

    def apply(self, images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Crop/flip a batch of raw images (N, C, H, W) on whatever device they are on."""
        if self.crop_padding > 0:
            n, _, h, w = images.shape
            p = self.crop_padding
            padded = torch.nn.functional.pad(images, (p, p, p, p))
            rows = offsets[:, :1] + torch.arange(h, device=images.device)  # (N, H)
            cols = offsets[:, 1:] + torch.arange(w, device=images.device)  # (N, W)
            batch = torch.arange(n, device=images.device)[:, None, None]
            images = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        if self.hflip:
            images = torch.where(flips[:, None, None, None], images.flip(3), images)
        return images


class _Loader:
    def __init__(self, split: Split, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 device: torch.device, augment: Augment = Augment(), shuffle: bool = False, world: World = SINGLE):
        self.num_samples = len(split)
        self.batch_size = batch_size
        self.world = world
        self.device = torch.device(device)
        self.augment = augment
        self.shuffle = shuffle
        self.scale = 255.0 if split.images.dtype == torch.uint8 else 1.0
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    @property
    def augmented(self) -> bool:
        """Whether a sample's input changes from epoch to epoch (random crops or flips)."""
        return self.augment.active

    def _global_batches(self, order: torch.Tensor):
        """(positions in the epoch's plan of this rank's samples, its share) for each global batch."""
        for start in range(0, self.num_samples, self.batch_size):
            size = min(self.batch_size, self.num_samples - start)
            positions = torch.arange(start + self.world.rank, start + size, self.world.size)
            yield positions, len(positions) / size

    def _plan(self, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.num_samples, generator=generator) if self.shuffle else torch.arange(self.num_samples)
        offsets, flips = self._augment_params(self.num_samples, generator)
        return order, offsets[order], flips[order]

    def _augment_params(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augment.active:
            return self.augment.sample(n, generator)
        return torch.full((n, 2), self.augment.crop_padding), torch.zeros(n, dtype=torch.bool)

    def take(self, indices: torch.Tensor, generator: torch.Generator) -> Batch:
        """The batch of these dataset indices, augmented with parameters drawn from `generator`: for methods that
        sample their own batches (class-paired batches, CS-KD) through Method.batches()."""
        indices = torch.as_tensor(indices, dtype=torch.long).cpu()
        offsets, flips = self._augment_params(len(indices), generator)
        images, labels = self._raw(indices)
        # in a distributed job every rank draws a batch of its own: each is 1/world of the global one
        return self._finish(images, labels, indices.to(self.device), offsets, flips, 1.0 / self.world.size)

    def unsharded(self) -> "_Loader":
        """The same loader over the whole split on every rank (a teacher cache needs every sample's outputs)."""
        whole = copy.copy(self)
        whole.world = SINGLE
        return whole

    def _finish(self, raw: torch.Tensor, targets, indices, offsets, flips, share: float = 1.0) -> Batch:
        offsets, flips = offsets.to(self.device), flips.to(self.device)
        x = raw.to(self.device, non_blocking=True).float()
        if self.scale != 1.0:
            x = x / self.scale
        if self.augment.active:
            x = self.augment.apply(x, offsets, flips)
        x = (x - self.mean) / self.std
        return Batch(x, targets.to(self.device, non_blocking=True), indices.to(self.device), offsets, flips, share)


class DeviceLoader(_Loader):
    """The whole split as one tensor on the device; order, crop and flip are computed there."""

    def __init__(self, split: Split, *args, **kwargs):
        super().__init__(split, *args, **kwargs)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)

    def _raw(self, indices: torch.Tensor):
        idx = indices.to(self.device)
        return self.images[idx], self.labels[idx]

    def epoch(self, seed: int = 0) -> Iterator[Batch]:
        order, offsets, flips = self._plan(seed)
        order_dev = order.to(self.device)
        if not self.world.distributed:  # the common case, without indexing the plan per batch
            for start in range(0, self.num_samples, self.batch_size):
                idx = order_dev[start:start + self.batch_size]
                sl = slice(start, start + self.batch_size)
                yield self._finish(self.images[idx], self.labels[idx], idx, offsets[sl], flips[sl])
            return
        for positions, share in self._global_batches(order):
            idx = order_dev[positions.to(self.device)]
            yield self._finish(self.images[idx], self.labels[idx], idx, offsets[positions], flips[positions], share)


class _IndexedSplit(torch.utils.data.Dataset):
    def __init__(self, split: Split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return self.split.images[i], self.split.labels[i], i


class StreamLoader(_Loader):
    """The split stays in host memory; a DataLoader (workers, pinned memory) streams raw batches to the device,
    where the same augmentation as DeviceLoader runs. For data that does not fit on the device."""

    def __init__(self, split: Split, *args, num_workers: int = 0, **kwargs):
        super().__init__(split, *args, **kwargs)
        self.dataset = _IndexedSplit(split)
        self.num_workers = num_workers

    def _raw(self, indices: torch.Tensor):
        return self.dataset.split.images[indices], self.dataset.split.labels[indices]

    def epoch(self, seed: int = 0) -> Iterator[Batch]:
        order, offsets, flips = self._plan(seed)
        batches = [(positions, share) for positions, share in self._global_batches(order)]
        loader = DataLoader(self.dataset, batch_sampler=[order[p].tolist() for p, _ in batches],
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        for (raw, targets, indices), (positions, share) in zip(loader, batches):
            yield self._finish(raw, targets, indices, offsets[positions], flips[positions], share)
