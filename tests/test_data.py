"""Datasets load (digits, MNIST from ../shared/data, synthetic) and both loaders replay identical augmented batches."""
import pytest
import torch
import torch.nn.functional as F

from kdbench.data import Augment, DeviceLoader, Split, StreamLoader, load_splits
from kdbench.errors import DataNotFound
from tests.conftest import SHARED_MNIST, compose_config


def test_digits_split():
    train, test = load_splits(compose_config(["dataset=digits"]).dataset)
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape[1:] == (1, 8, 8) and 0 <= train.images.min() and train.images.max() <= 1


def test_mnist_from_shared_data(monkeypatch):
    monkeypatch.setenv("KDBENCH_DATA", str(SHARED_MNIST))
    train, test = load_splits(compose_config(["dataset=mnist"]).dataset)
    assert (len(train), len(test)) == (60000, 10000) and train.images.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_missing_dataset_offline_says_where_to_put_files(monkeypatch, tmp_path):
    monkeypatch.setenv("KDBENCH_DATA", str(tmp_path))
    with pytest.raises(DataNotFound, match="KDBENCH_DATA") as err:
        load_splits(compose_config(["dataset=cifar100"]).dataset)
    assert str(tmp_path) in str(err.value) and "download=true" in str(err.value)


def test_synthetic_is_seeded_and_shaped():
    ds = compose_config(["dataset=synthetic", "dataset.train_size=50", "dataset.test_size=10"]).dataset
    a, b = load_splits(ds)[0], load_splits(ds)[0]
    assert a.images.shape == (50, 3, 32, 32) and torch.equal(a.images, b.images) and a.labels.max() < 100


def test_exclude_train_classes():
    ds = compose_config(["dataset=digits", "dataset.exclude_train_classes=[3]"]).dataset
    train, test = load_splits(ds)
    assert 3 not in train.labels.tolist() and 3 in test.labels.tolist()


def test_crop_and_flip_match_torchvision_semantics():
    images = torch.rand(3, 2, 5, 6)
    offsets, flips = torch.tensor([[0, 0], [4, 1], [2, 3]]), torch.tensor([True, False, True])
    got = Augment(crop_padding=2, hflip=True).apply(images, offsets, flips)
    for i in range(3):  # zero-pad, crop at (dy, dx), then flip -- written out per sample
        dy, dx = offsets[i].tolist()
        want = F.pad(images[i], (2, 2, 2, 2))[:, dy:dy + 5, dx:dx + 6]
        assert torch.equal(got[i], want.flip(2) if flips[i] else want)


def test_device_and_stream_loaders_yield_identical_batches():
    split = Split((torch.rand(37, 3, 8, 8) * 255).to(torch.uint8), torch.arange(37) % 5)
    args = (8, [0.5] * 3, [0.2] * 3, "cpu")
    kwargs = dict(augment=Augment(2, True), shuffle=True)
    for a, b in zip(DeviceLoader(split, *args, **kwargs).epoch(seed=3), StreamLoader(split, *args, **kwargs).epoch(seed=3)):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.inputs, b.inputs) and torch.equal(a.flips, b.flips)
        assert torch.equal(a.targets, split.labels[a.indices])
    batches = list(DeviceLoader(split, *args, **kwargs).epoch(seed=3))
    assert sum(len(b) for b in batches) == 37 and sorted(torch.cat([b.indices for b in batches]).tolist()) == list(range(37))
