"""A job's data on its device: both splits, the seeded augmenting training loader and the plain test loader."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kdbench.data.datasets import Split, load_splits
from kdbench.data.folders import FolderLoader, FolderSplit
from kdbench.data.loader import Augment, DeviceLoader, StreamLoader
from kdbench.distributed import SINGLE, World


@dataclass
class Data:
    train: Split | FolderSplit
    test: Split | FolderSplit
    train_loader: DeviceLoader | StreamLoader
    test_loader: DeviceLoader | StreamLoader
    input_shape: tuple[int, ...]
    num_classes: int


def prepare_data(dataset, trainer, device: torch.device, world: World = SINGLE) -> Data:
    """`dataset` a DatasetConfig, `trainer` a TrainerConfig (batch sizes: the global ones, where the data lives).
    Only the training loader augments; the test split is always evaluated as it is, in dataset order. Each rank of
    a distributed job iterates its share of every batch."""
    train, test = load_splits(dataset)
    if isinstance(train, FolderSplit):  # files decoded in workers: the ImageNet pipeline
        size = int(dataset.image_shape[-1])
        kwargs = dict(mean=list(dataset.mean), std=list(dataset.std), device=device, size=size,
                      eval_resize=dataset.eval_resize, num_workers=trainer.num_workers, world=world)
        return Data(train, test, FolderLoader(train, trainer.batch_size, train=True, hflip=dataset.hflip, **kwargs),
                    FolderLoader(test, trainer.eval_batch_size, train=False, **kwargs), tuple(dataset.image_shape),
                    int(dataset.num_classes))
    if trainer.data_on_device:
        loader_cls, extra = DeviceLoader, {}
    else:
        loader_cls, extra = StreamLoader, {"num_workers": trainer.num_workers}
    norm = (list(dataset.mean), list(dataset.std), device)
    augment = Augment(dataset.crop_padding, dataset.hflip)
    return Data(train, test,
                loader_cls(train, trainer.batch_size, *norm, augment=augment, shuffle=True, world=world, **extra),
                loader_cls(test, trainer.eval_batch_size, *norm, world=world, **extra),
                tuple(train.images.shape[1:]), int(dataset.num_classes))
