"""Datasets as raw tensors: images (N, C, H, W) uint8 or float in [0, 1], labels int64.

Normalisation and augmentation happen later, on the training device (kdbench.data.loader), so every
split can live as one tensor on the GPU and every augmented batch can be replayed from its parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kdbench.errors import DataNotFound, KDBenchError
from kdbench.registry import Registry


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W), uint8 (0..255) or float (0..1)
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.images[index], self.labels[index])


DATASETS: Registry = Registry("dataset")
# Full training-set sizes (before train_size / exclude_train_classes), so that a dry run needs no data.
# digits: kdbench's stratified 80/20 split of scikit-learn's 1797 images (_digits below).
TRAIN_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "mnist": 60_000, "digits": 1_437, "imagenet": 1_281_167,
               "tiny_imagenet": 100_000}
SYNTHETIC_DEFAULT_SIZE = 1_000  # _synthetic without dataset.train_size


def list_datasets() -> list[str]:
    return DATASETS.names()


def planned_train_size(cfg) -> int:
    """The number of training samples load_splits would give, from known set sizes (no data needed);
    exclude_train_classes is approximated as 1/num_classes of the set per excluded class."""
    if cfg.name == "synthetic":
        full = cfg.train_size or SYNTHETIC_DEFAULT_SIZE
    elif cfg.name == "imagefolder" and (Path(cfg.root).expanduser() / "train").is_dir():
        full = sum(1 for p in (Path(cfg.root).expanduser() / "train").rglob("*") if p.is_file())
    elif cfg.name in TRAIN_SIZES:
        full = TRAIN_SIZES[cfg.name]
    else:
        raise KDBenchError(f"dry run: no known training-set size for dataset '{cfg.name}'; add it to "
                           f"kdbench.data.datasets.TRAIN_SIZES")
    kept = round(full * (1 - len(cfg.exclude_train_classes or []) / cfg.num_classes))
    if getattr(cfg, "samples_per_class", None):
        kept = min(kept, cfg.samples_per_class * (cfg.num_classes - len(cfg.exclude_train_classes or [])))
    if cfg.train_size is not None and cfg.name != "synthetic":
        kept = min(kept, cfg.train_size)
    return kept


def dataset_label(cfg) -> str:
    """The dataset as leaderboards name it: a transfer set without some classes is its own dataset, named by the
    classes left out (mnist-no3) or, when fewer are kept, by those kept (mnist-only78)."""
    shots = cfg.get("samples_per_class") if hasattr(cfg, "get") else getattr(cfg, "samples_per_class", None)
    name = f"{cfg.name}-{int(shots)}shot" if shots else str(cfg.name)  # an N-shot transfer set: cifar100-10shot
    excluded = sorted(int(c) for c in cfg.exclude_train_classes or [])
    if not excluded:
        return name
    kept = [c for c in range(int(cfg.num_classes)) if c not in excluded]
    if len(kept) < len(excluded):
        return f"{name}-only{''.join(map(str, kept))}"
    return f"{name}-no{''.join(map(str, excluded))}"


def load_splits(cfg) -> tuple[Split, Split]:
    """(train, test) for a dataset config (kdbench.config.DatasetConfig), after subsetting/class exclusion."""
    train, test = DATASETS.get(cfg.name)(cfg)
    if cfg.exclude_train_classes:
        keep = ~torch.isin(train.labels, torch.tensor(list(cfg.exclude_train_classes)))
        train = train.subset(keep.nonzero().squeeze(1))
    generator = torch.Generator().manual_seed(cfg.seed)
    if getattr(cfg, "samples_per_class", None):
        train = train.subset(per_class_subset(train.labels, cfg.samples_per_class, generator))
    if cfg.train_size is not None and cfg.name != "synthetic":
        train = train.subset(torch.randperm(len(train), generator=generator)[: cfg.train_size])
    if cfg.test_size is not None and cfg.name != "synthetic":
        test = test.subset(torch.randperm(len(test), generator=generator)[: cfg.test_size])
    return train, test


def per_class_subset(labels: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of a seeded random subset of `per_class` samples of every class (all of a smaller class): the
    N-shot transfer sets of few-shot distillation (NetGraft, FSKD)."""
    keep = []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().squeeze(1)
        keep.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    return torch.sort(torch.cat(keep)).values


def _missing(name: str, root: Path, layout: str) -> DataNotFound:
    return DataNotFound(
        f"{name} not found under {root} (expected {layout}). Put the files there, point KDBENCH_DATA "
        f"(paths.data_dir) at the folder that holds them, or pass dataset.download=true on a machine with internet."
    )


@DATASETS.register("digits")
def _digits(cfg):
    """scikit-learn's bundled 8x8 digits (1797 images, 16 grey levels): offline, seconds to train on."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=0.2, random_state=0, stratify=bunch.target)
    return Split(images[train_idx], labels[train_idx]), Split(images[test_idx], labels[test_idx])


def _torchvision(cls, name: str, layout: str, cfg):
    root = Path(cfg.root).expanduser()
    try:
        splits = [cls(root=str(root), train=train, download=cfg.download) for train in (True, False)]
    except RuntimeError as err:
        if "not found" in str(err).lower() or "download" in str(err).lower():
            raise _missing(name, root, layout) from None
        raise
    out = []
    for ds in splits:
        images = torch.as_tensor(ds.data)
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
        out.append(Split(images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)))
    return tuple(out)


@DATASETS.register("mnist")
def _mnist(cfg):
    from torchvision.datasets import MNIST

    return _torchvision(MNIST, "MNIST", "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte", cfg)


@DATASETS.register("cifar10")
def _cifar10(cfg):
    from torchvision.datasets import CIFAR10

    return _torchvision(CIFAR10, "CIFAR-10", "cifar-10-batches-py/", cfg)


@DATASETS.register("cifar100")
def _cifar100(cfg):
    from torchvision.datasets import CIFAR100

    return _torchvision(CIFAR100, "CIFAR-100", "cifar-100-python/", cfg)


@DATASETS.register("synthetic")
def _synthetic(cfg):
    """Seeded stand-in of any shape and class count: smooth class prototypes plus pixel noise, in [0, 1].

    Learnable (a net gets well above chance in a few epochs), so end-to-end tests exercise real training.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    c, h, w = cfg.image_shape
    coarse = torch.randn(cfg.num_classes, c, max(h // 4, 1), max(w // 4, 1), generator=generator)
    prototypes = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)

    def make(n: int) -> Split:
        labels = torch.arange(n) % cfg.num_classes
        labels = labels[torch.randperm(n, generator=generator)]
        noise = torch.randn(n, c, h, w, generator=generator)
        images = torch.sigmoid(1.5 * prototypes[labels] + noise)
        return Split(images, labels)

    return make(cfg.train_size or SYNTHETIC_DEFAULT_SIZE), make(cfg.test_size or 200)
