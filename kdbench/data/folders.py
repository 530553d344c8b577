"""Image-folder data (ImageNet and any `root/{train,val}/<class>/*` tree): files decoded in DataLoader workers.

The standard ImageNet pipeline: RandomResizedCrop(size, scale (0.08, 1), ratio (3/4, 4/3)) + horizontal flip for
training, Resize(size * 8/7 = 256 for 224) + CenterCrop(size) for evaluation, then ImageNet's mean/std on the device.
Each sample's crop and flip come from a seed drawn in the epoch's plan (the same plan as the tensor loaders: order
and per-sample parameters from one generator per epoch), so an epoch replays exactly whatever the number of workers
or ranks; batches carry their dataset indices, the crop's top-left corner and the flip. A random-resized crop makes
every view new, so a teacher-output cache is never exact for these loaders (kdbench.teachers.cache_is_exact).

Layouts (under KDBENCH_DATA, paths.data_dir):
  imagefolder    <dataset.root>/{train,val}/<class>/<image>     classes sorted by folder name
  imagenet       <data_dir>/imagenet/{train,val}/<wnid>/<image>.JPEG  (ILSVRC-2012, the validation images moved
                 into class folders, e.g. with the usual valprep.sh)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from kdbench.data.datasets import DATASETS
from kdbench.data.loader import Augment, Batch, _Loader
from kdbench.distributed import SINGLE, World
from kdbench.errors import DataNotFound

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


@dataclass
class FolderSplit:
    """Image files and their labels (decoded when a batch needs them)."""

    paths: list[str]
    labels: torch.Tensor  # (N,) int64
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "FolderSplit":
        index = torch.as_tensor(index)
        return FolderSplit([self.paths[int(i)] for i in index], self.labels[index], self.classes)


def _layout_error(name: str, root: Path, what: str) -> DataNotFound:
    return DataNotFound(f"{name}: {what} under {root}; expected {root}/train/<class>/<image> and "
                        f"{root}/val/<class>/<image> (point KDBENCH_DATA, paths.data_dir, or dataset.root at it)")


def scan_folder(name: str, root: Path, split: str, classes: Sequence[str] | None = None) -> FolderSplit:
    """The images of root/split/<class>/*, labelled by the sorted class folders (or by `classes`)."""
    base = root / split
    if not base.is_dir():
        raise _layout_error(name, root, f"no '{split}' folder")
    found = sorted(p.name for p in base.iterdir() if p.is_dir())
    classes = list(classes) if classes is not None else found
    if not classes:
        raise _layout_error(name, root, f"no class folders in '{split}'")
    if found != classes:
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise _layout_error(name, root, f"the '{split}' classes differ from 'train' (extra {extra[:3]}, missing "
                                        f"{missing[:3]})")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (base / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    if not paths:
        raise _layout_error(name, root, f"no images in '{split}'")
    return FolderSplit(paths, torch.tensor(labels, dtype=torch.int64), classes)


def folder_splits(name: str, root: Path, num_classes: int) -> tuple[FolderSplit, FolderSplit]:
    train = scan_folder(name, root, "train")
    if len(train.classes) != num_classes:
        raise _layout_error(name, root, f"{len(train.classes)} class folders in 'train' but dataset.num_classes="
                                        f"{num_classes}")
    return train, scan_folder(name, root, "val", train.classes)


@DATASETS.register("imagefolder")
def _imagefolder(cfg):
    return folder_splits("imagefolder", Path(cfg.root).expanduser(), int(cfg.num_classes))


@DATASETS.register("imagenet")
def _imagenet(cfg):
    return folder_splits("ImageNet (ILSVRC-2012)", Path(cfg.root).expanduser() / "imagenet", int(cfg.num_classes))


# ----------------------------------------------------------------------------- decoding and the loader


def random_resized_crop_params(h: int, w: int, generator: torch.Generator, scale=(0.08, 1.0),
                               ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) as torchvision's RandomResizedCrop.get_params draws them, from `generator`."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, w - cw + 1, (1,), generator=generator).item())
            return top, left, ch, cw
    in_ratio = w / h  # fallback: the central crop of the allowed aspect
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def decode_rgb(path: str) -> torch.Tensor:
    """An image file as a uint8 (3, H, W) tensor, decoded by PIL as torchvision's ImageFolder does (torchvision.io's
    decoders are deprecated from torchvision 0.29)."""
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    with Image.open(path) as image:
        return pil_to_tensor(image.convert("RGB"))


class _FolderDataset(Dataset):
    """Item (index, seed) -> (uint8 CHW crop, label, index, top, left, flip); training crops are random-resized
    and flipped from the seed, evaluation crops are resize + center crop."""

    def __init__(self, split: FolderSplit, size: int, train: bool, hflip: bool, eval_resize: int):
        self.split, self.size, self.train, self.hflip, self.eval_resize = split, size, train, hflip, eval_resize

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item):
        from torchvision.transforms.v2 import functional as F

        index, seed = item
        image = decode_rgb(self.split.paths[index])
        h, w = image.shape[-2:]
        flip = False
        if self.train:
            g = torch.Generator().manual_seed(int(seed))
            top, left, ch, cw = random_resized_crop_params(h, w, g)
            image = F.resized_crop(image, top, left, ch, cw, [self.size, self.size], antialias=True)
            flip = self.hflip and bool(torch.rand(1, generator=g).item() < 0.5)
            if flip:
                image = F.horizontal_flip(image)
        else:
            image = F.resize(image, self.eval_resize, antialias=True)
            h, w = image.shape[-2:]
            top, left = (h - self.size) // 2, (w - self.size) // 2
            image = F.center_crop(image, [self.size, self.size])
        return image, int(self.split.labels[index]), index, top, left, flip


class _PlanSampler:
    """The current epoch's batches of (index, seed) items: one object for the DataLoader's whole life, so workers
    can persist across epochs."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class FolderLoader(_Loader):
    """Batches of decoded image files: DataLoader workers decode and crop (uint8), the device normalises."""

    def __init__(self, split: FolderSplit, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 device: torch.device, size: int, train: bool, hflip: bool = True, eval_resize: int | None = None,
                 num_workers: int = 0, world: World = SINGLE):
        self.num_samples = len(split)
        self.batch_size = batch_size
        self.world = world
        self.device = torch.device(device)
        self.shuffle = train
        self.augment = Augment(0, hflip and train)
        self.random_resized = train  # a teacher cache is never exact over random-resized crops
        self.scale = 255.0
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self.split = split
        self.dataset = _FolderDataset(split, size, train, hflip, eval_resize or round(size * 8 / 7))
        self.sampler = _PlanSampler()
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=num_workers,
                                 pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0)

    @property
    def augmented(self) -> bool:
        return self.random_resized

    def epoch(self, seed: int = 0) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.num_samples, generator=generator) if self.shuffle else torch.arange(self.num_samples)
        seeds = torch.randint(0, 2**31 - 1, (self.num_samples,), generator=generator)[order]
        batches = list(self._global_batches(order))
        self.sampler.batches = [list(zip(order[p].tolist(), seeds[p].tolist())) for p, _ in batches]
        for (images, targets, indices, top, left, flips), (_, share) in zip(self.loader, batches):
            offsets = torch.stack([top, left], 1)
            yield self._finish(images, targets, indices, offsets, flips.bool(), share)

    def _finish(self, raw, targets, indices, offsets, flips, share: float = 1.0) -> Batch:
        x = raw.to(self.device, non_blocking=True).float() / self.scale
        x = (x - self.mean) / self.std
        return Batch(x, targets.to(self.device, non_blocking=True), indices.to(self.device), offsets.to(self.device),
                     flips.to(self.device), share)

    def take(self, indices, generator):
        raise NotImplementedError("image-folder loaders serve whole epochs; a method sampling its own batches needs "
                                  "a tensor dataset")

    def unsharded(self) -> "FolderLoader":
        raise NotImplementedError("no teacher cache over random-resized crops")


# ----------------------------------------------------------------------------- Tiny ImageNet (decoded into tensors)


@DATASETS.register("tiny_imagenet")
def _tiny_imagenet(cfg):
    """Tiny ImageNet (200 classes, 64x64): <data_dir>/tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG,
    val/images/*.JPEG, val/val_annotations.txt}. Small enough to decode once into uint8 tensors, so it trains on
    the device like CIFAR (crop with padding and flips, dataset.crop_padding / hflip)."""
    from kdbench.data.datasets import Split

    root = Path(cfg.root).expanduser() / "tiny-imagenet-200"
    layout = ("expected <dir>/tiny-imagenet-200/wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
              "val/val_annotations.txt (point KDBENCH_DATA, paths.data_dir, at <dir>)")
    wnids_file, annotations = root / "wnids.txt", root / "val" / "val_annotations.txt"
    if not wnids_file.exists() or not annotations.exists():
        raise DataNotFound(f"Tiny ImageNet not found under {root}: {layout}")
    wnids = wnids_file.read_text().split()
    index = {w: i for i, w in enumerate(wnids)}

    def load(items: list[tuple[Path, int]]) -> Split:
        images = torch.stack([decode_rgb(str(p)) for p, _ in items])
        return Split(images, torch.tensor([label for _, label in items], dtype=torch.int64))

    train = [(p, index[w]) for w in wnids for p in sorted((root / "train" / w / "images").glob("*.JPEG"))]
    val = []
    for line in annotations.read_text().splitlines():
        name, wnid = line.split("\t")[:2]
        if wnid not in index:
            raise DataNotFound(f"Tiny ImageNet: {annotations} names class {wnid}, which wnids.txt lacks; {layout}")
        val.append((root / "val" / "images" / name, index[wnid]))
    if not train or not val:
        raise DataNotFound(f"Tiny ImageNet under {root} has no images: {layout}")
    return load(train), load(val)
