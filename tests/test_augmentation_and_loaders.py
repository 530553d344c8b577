"""Configuration -> data: augmentation statistics, torchvision-equal crops and flips, normalisation constants, the
train/test loaders prepare_data builds, per-sample seeding of each epoch's plan, and class exclusion / subsets.

Expected values come from torchvision's own functional transforms, from counts and formulas written out here, or
from the reference recipe (/work/shared/reference/methods.md section 1.1), never from the code under test.
"""
import math

import pytest
import torch
import torchvision.transforms.functional as TF

from kdbench.data import DATASETS, Augment, DeviceLoader, Split, StreamLoader, load_splits
from kdbench.data import prepare_data
from kdbench.train import epoch_seed
from tests.conftest import SHARED_MNIST, compose_config

CPU = torch.device("cpu")


def _normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """(raw/255 - mean)/std for uint8 images, (raw - mean)/std for floats in [0, 1], written out per channel."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    return (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def _torchvision_augment(image: torch.Tensor, padding: int, dy: int, dx: int, flip: bool) -> torch.Tensor:
    """RandomCrop(H, padding, fill=0) at (dy, dx) then RandomHorizontalFlip, with torchvision's functional ops."""
    h, w = image.shape[-2:]
    out = TF.crop(TF.pad(image, [padding], fill=0), dy, dx, h, w) if padding else image
    return TF.hflip(out) if flip else out


def _plan(loader, seed):
    """One epoch as the per-sample sequence [(index, (dy, dx), flip), ...], whatever the batch size."""
    return [(i, tuple(o), f) for b in loader.epoch(seed)
            for i, o, f in zip(b.indices.tolist(), b.crop_offsets.tolist(), b.flips.tolist())]


def _fake_split(n, shape=(3, 8, 8), seed=0, dtype=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    return Split(images if dtype == torch.uint8 else images.float() / 255, torch.arange(n) % 10)


# ----------------------------------------------------------------------------- Augment.sample: the statistics


def test_horizontal_flips_are_drawn_with_probability_one_half():
    n = 40_000
    _, flips = Augment(crop_padding=4, hflip=True).sample(n, torch.Generator().manual_seed(123))
    sigma = math.sqrt(0.25 / n)  # binomial(n, 0.5) fraction
    assert abs(flips.float().mean().item() - 0.5) < 5 * sigma


def test_no_flips_are_drawn_when_hflip_is_off():
    _, flips = Augment(crop_padding=4, hflip=False).sample(1000, torch.Generator().manual_seed(0))
    assert not flips.any()


@pytest.mark.parametrize("padding", [1, 4])
def test_crop_offsets_cover_zero_to_two_padding_inclusive_uniformly_on_both_axes(padding):
    # torchvision's RandomCrop(H, padding=p) draws top/left from randint(0, (H + 2p) - H + 1): 0..2p inclusive.
    values = 2 * padding + 1
    n = 3_000 * values
    offsets, _ = Augment(crop_padding=padding, hflip=True).sample(n, torch.Generator().manual_seed(7))
    assert offsets.shape == (n, 2)
    expected, sd = n / values, math.sqrt(n * (1 / values) * (1 - 1 / values))
    for axis in (0, 1):
        counts = torch.bincount(offsets[:, axis], minlength=values)
        assert len(counts) == values, f"axis {axis}: offsets outside 0..{2 * padding}"
        assert all(abs(c - expected) < 5 * sd for c in counts.tolist()), (axis, counts.tolist())
    # every (dy, dx) pair occurs: the two axes are drawn independently
    assert len(set(map(tuple, offsets.tolist()))) == values * values


# ----------------------------------------------------------------------------- Augment.apply == torchvision


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_apply_equals_torchvision_pad_crop_and_hflip_with_zero_fill(dtype):
    p = 4
    images = _fake_split(1, shape=(3, 10, 12), seed=3).images.to(dtype).expand(2 * (2 * p + 1) ** 2, -1, -1, -1)
    if dtype == torch.float32:
        images = images / 255.0
    grid = [(dy, dx, f) for dy in range(2 * p + 1) for dx in range(2 * p + 1) for f in (False, True)]
    offsets = torch.tensor([[dy, dx] for dy, dx, _ in grid])
    flips = torch.tensor([f for _, _, f in grid])
    got = Augment(crop_padding=p, hflip=True).apply(images, offsets, flips)
    for k, (dy, dx, f) in enumerate(grid):
        assert torch.equal(got[k], _torchvision_augment(images[k], p, dy, dx, f)), (dy, dx, f)
    # the centre crop without a flip is the image itself; a corner crop brings in exact zeros (zero fill)
    centre = grid.index((p, p, False))
    assert torch.equal(got[centre], images[centre])
    assert (got[grid.index((0, 0, False))][:, :p, :] == 0).all()


# ----------------------------------------------------------------------------- the two loaders


@pytest.mark.parametrize("shuffle,augment", [(True, Augment(2, True)), (False, Augment())])
def test_device_and_stream_loaders_yield_identical_batches_with_identical_parameters(shuffle, augment):
    split = _fake_split(45, shape=(3, 8, 8), seed=1)
    args = (8, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], CPU)
    dev = list(DeviceLoader(split, *args, augment=augment, shuffle=shuffle).epoch(seed=11))
    stream = list(StreamLoader(split, *args, augment=augment, shuffle=shuffle).epoch(seed=11))
    assert [len(b) for b in dev] == [len(b) for b in stream] == [8] * 5 + [5]
    for a, b in zip(dev, stream):
        for field in ("inputs", "targets", "indices", "crop_offsets", "flips"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field


# ----------------------------------------------------------------------------- normalisation constants


EXPECTED_NORMALISATION = {
    # methods.md section 1.1 (RepDistiller and mdistiller, CIFAR-100).
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    # CIFAR-10: the per-channel pixel mean/std of the 50,000 training images, the values torchvision-based CIFAR-10
    # code uses (e.g. mean 0.4914/0.4822/0.4465); the AT authors' cifar.py (this repo's CIFAR-10 table) normalises by
    # (125.3, 123.0, 113.9)/255 and (63.0, 62.1, 66.7)/255 = the same to 3 decimals. Not kuangliu/pytorch-cifar's
    # often-copied std (0.2023, 0.1994, 0.2010), which is not the pixel std.
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    # MNIST: pytorch/examples mnist/main.py's Normalize((0.1307,), (0.3081,)); checked against the data below.
    "mnist": ((0.1307,), (0.3081,)),
    # digits: the repo's rounded statistics of the 8x8 images scaled to [0, 1] (checked against the data below).
    "digits": ((0.3,), (0.38,)),
    # synthetic: sigmoid(prototype + noise) lies in (0, 1) around 0.5; the repo's fixed constants.
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    # ImageNet (and any image folder by default): torchvision's ImageNet statistics, the values RepDistiller's and
    # mdistiller's ImageNet loaders use.
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Tiny ImageNet: the per-channel pixel mean/std of its training images (mdistiller's mean; its std constants
    # 0.2302/0.2265/0.2262 are not the pixel std).
    "tiny_imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}
EXPECTED_AUGMENTATION = {"cifar100": (4, True), "cifar10": (4, True), "synthetic": (4, True), "mnist": (0, False),
                         "digits": (0, False), "imagenet": (0, True), "imagefolder": (0, True),
                         "tiny_imagenet": (8, True)}


@pytest.mark.parametrize("name", sorted(EXPECTED_NORMALISATION))
def test_dataset_config_pins_normalisation_and_augmentation(name):
    ds = compose_config([f"dataset={name}"]).dataset
    mean, std = EXPECTED_NORMALISATION[name]
    assert tuple(ds.mean) == pytest.approx(mean, abs=1e-9) and tuple(ds.std) == pytest.approx(std, abs=1e-9)
    assert len(ds.mean) == len(ds.std) == ds.image_shape[0]
    assert (ds.crop_padding, ds.hflip) == EXPECTED_AUGMENTATION[name]


def test_every_dataset_config_is_pinned():
    from kdbench.config import CONF_DIR

    assert {p.stem for p in (CONF_DIR / "dataset").glob("*.yaml")} == set(EXPECTED_NORMALISATION)


def test_digits_constants_are_the_statistics_of_its_training_images():
    train, _ = load_splits(compose_config(["dataset=digits"]).dataset)
    assert round(train.images.mean().item(), 2) == 0.31 and round(train.images.std().item(), 2) == 0.38


# ----------------------------------------------------------------------------- prepare_data: what the loaders serve


def _fake_cifar100(cfg):
    """CIFAR-100 as torchvision gives it (uint8, N x 3 x 32 x 32), without the files."""
    return _fake_split(40, shape=(3, 32, 32), seed=5), _fake_split(24, shape=(3, 32, 32), seed=6)


def test_cifar100_loaders_normalise_with_the_reference_constants_and_augment_only_training(monkeypatch):
    monkeypatch.setitem(DATASETS._items, "cifar100", _fake_cifar100)
    cfg = compose_config(["dataset=cifar100", "trainer.batch_size=16", "trainer.eval_batch_size=10"])
    data = prepare_data(cfg.dataset, cfg.trainer, CPU)
    mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)  # methods.md section 1.1
    test = list(data.test_loader.epoch())
    assert torch.equal(torch.cat([b.inputs for b in test]), _normalise(data.test.images, mean, std))
    flips = []
    for b in data.train_loader.epoch(epoch_seed(1, 1)):
        for i, (dy, dx), f, x in zip(b.indices.tolist(), b.crop_offsets.tolist(), b.flips.tolist(), b.inputs):
            want = _normalise(_torchvision_augment(data.train.images[i], 4, dy, dx, f)[None], mean, std)[0]
            assert torch.equal(x, want)  # augment the raw image (zero fill), then normalise
            flips.append(f)
    assert 0 < sum(flips) < len(flips)


@pytest.mark.parametrize("data_on_device", [True, False])
def test_test_split_is_never_augmented_nor_shuffled_in_any_epoch(data_on_device):
    cfg = compose_config(["dataset=synthetic", "dataset.num_classes=10", "dataset.train_size=48",
                          "dataset.test_size=20", "trainer.batch_size=16", "trainer.eval_batch_size=7",
                          f"trainer.data_on_device={data_on_device}"])
    assert cfg.dataset.crop_padding == 4 and cfg.dataset.hflip
    data = prepare_data(cfg.dataset, cfg.trainer, CPU)
    plain = _normalise(data.test.images, cfg.dataset.mean, cfg.dataset.std)
    for seed in (None, 0, 1, epoch_seed(1, 2), epoch_seed(3, 7)):
        batches = list(data.test_loader.epoch() if seed is None else data.test_loader.epoch(seed))
        assert torch.equal(torch.cat([b.indices for b in batches]), torch.arange(20))
        assert torch.equal(torch.cat([b.inputs for b in batches]), plain)
        assert not torch.cat([b.flips for b in batches]).any()
    # ... while the training split of the same config is cropped, flipped and shuffled
    train = list(data.train_loader.epoch(epoch_seed(1, 1)))
    indices = torch.cat([b.indices for b in train])
    assert not torch.equal(indices, torch.arange(48)) and sorted(indices.tolist()) == list(range(48))
    assert torch.cat([b.flips for b in train]).any() and (torch.cat([b.crop_offsets for b in train]) != 4).any()
    inputs = torch.cat([b.inputs for b in train])
    assert not torch.equal(inputs, _normalise(data.train.images, cfg.dataset.mean, cfg.dataset.std)[indices])


def test_digits_loaders_serve_normalised_float_images_unaugmented():
    cfg = compose_config(["dataset=digits", "trainer.batch_size=64", "trainer.eval_batch_size=100"])
    data = prepare_data(cfg.dataset, cfg.trainer, CPU)
    test = torch.cat([b.inputs for b in data.test_loader.epoch()])
    assert torch.equal(test, (data.test.images - 0.3) / 0.38)
    batch = next(iter(data.train_loader.epoch(epoch_seed(1, 1))))
    assert torch.equal(batch.inputs, (data.train.images[batch.indices] - 0.3) / 0.38)
    assert torch.equal(batch.targets, data.train.labels[batch.indices])


# ----------------------------------------------------------------------------- per-epoch plans from a seed


def _train_loader(batch_size, cls=DeviceLoader):
    return cls(_fake_split(50, seed=2), batch_size, [0.5] * 3, [0.25] * 3, CPU, augment=Augment(4, True), shuffle=True)


def test_epoch_plan_is_per_sample_and_does_not_depend_on_the_batch_size():
    for seed in (epoch_seed(1, 1), epoch_seed(2, 5)):
        plan = _plan(_train_loader(16), seed)
        assert plan == _plan(_train_loader(7), seed) == _plan(_train_loader(50), seed)
        assert plan == _plan(_train_loader(7, StreamLoader), seed)


def test_epoch_plan_is_the_same_for_the_same_seed_and_epoch_and_differs_otherwise():
    loader = _train_loader(16)
    plans = {(s, e): _plan(loader, epoch_seed(s, e)) for s in (1, 2, 3) for e in (1, 2, 3, 150)}
    assert all(_plan(loader, epoch_seed(s, e)) == plans[s, e] for s, e in [(1, 1), (3, 150)])  # replayable: resume
    keys = list(plans)
    for a in range(len(keys)):
        for b in range(a + 1, len(keys)):
            assert plans[keys[a]] != plans[keys[b]], (keys[a], keys[b])
            # not just the same order with other crops: the order itself changes
            assert [i for i, _, _ in plans[keys[a]]] != [i for i, _, _ in plans[keys[b]]]
    for plan in plans.values():  # each sample once per epoch, its own (offset, flip)
        assert sorted(i for i, _, _ in plan) == list(range(50))


def test_training_draws_a_new_plan_each_epoch_from_the_run_seed(run_job, monkeypatch):
    seen = []
    real_epoch = DeviceLoader.epoch

    def spy(self, seed=0):
        if self.shuffle:  # the training loader
            seen.append((seed, torch.cat([b.indices for b in real_epoch(self, seed)]).tolist()))
        return real_epoch(self, seed)

    monkeypatch.setattr(DeviceLoader, "epoch", spy)
    run_job("method=vanilla", "student=mlp_32", "trainer.epochs=3", "trainer.progress=false", "seed=4")
    assert [s for s, _ in seen] == [epoch_seed(4, e) for e in (1, 2, 3)]
    orders = [order for _, order in seen]
    assert orders[0] != orders[1] != orders[2] != orders[0]


# ----------------------------------------------------------------------------- class exclusion and subsets


def _rows(split: Split) -> list:
    return [(tuple(x.flatten().tolist()), int(y)) for x, y in zip(split.images, split.labels)]


def test_excluded_class_leaves_the_training_split_only_on_digits():
    full_train, full_test = load_splits(compose_config(["dataset=digits"]).dataset)
    train, test = load_splits(compose_config(["dataset=digits", "dataset.exclude_train_classes=[3]"]).dataset)
    keep = full_train.labels != 3
    assert 3 not in train.labels.tolist() and len(train) == 1437 - int((~keep).sum()) < 1437
    assert torch.equal(train.images, full_train.images[keep]) and torch.equal(train.labels, full_train.labels[keep])
    assert torch.equal(test.images, full_test.images) and torch.equal(test.labels, full_test.labels)
    assert (test.labels == 3).sum() > 0


def test_excluding_several_classes_keeps_only_the_others():
    ds = compose_config(["dataset=digits", "dataset.exclude_train_classes=[0,1,2,3,4,5,6,9]"]).dataset
    train, test = load_splits(ds)
    assert set(train.labels.tolist()) == {7, 8} and set(test.labels.tolist()) == set(range(10))


def test_train_and_test_subsets_are_seeded_reproducible_and_drawn_from_their_split():
    full_train, full_test = load_splits(compose_config(["dataset=digits"]).dataset)
    sub = ["dataset=digits", "dataset.train_size=100", "dataset.test_size=30"]
    a = load_splits(compose_config([*sub, "dataset.seed=0"]).dataset)
    b = load_splits(compose_config([*sub, "dataset.seed=0"]).dataset)
    c = load_splits(compose_config([*sub, "dataset.seed=1"]).dataset)
    assert (len(a[0]), len(a[1])) == (100, 30)
    assert all(torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels) for x, y in zip(a, b))
    assert not torch.equal(a[0].labels, c[0].labels) or not torch.equal(a[0].images, c[0].images)
    train_rows, test_rows = set(_rows(full_train)), set(_rows(full_test))
    for split, pool in ((a[0], train_rows), (a[1], test_rows), (c[0], train_rows)):
        assert set(_rows(split)) <= pool  # (image, label) pairs of the right split, kept together
    # drawn without replacement: a subset as large as the split is a reordering of it
    whole = load_splits(compose_config(["dataset=digits", "dataset.train_size=1437"]).dataset)[0]
    assert sorted(_rows(whole)) == sorted(_rows(full_train))
    # exclusion happens before subsetting: the subset has exactly train_size samples and none of the class
    ex = load_splits(compose_config([*sub, "dataset.exclude_train_classes=[3]"]).dataset)
    assert len(ex[0]) == 100 and 3 not in ex[0].labels.tolist() and len(ex[1]) == 30


@pytest.fixture(scope="module")
def mnist_env():
    mp = pytest.MonkeyPatch()
    mp.setenv("KDBENCH_DATA", str(SHARED_MNIST))
    yield
    mp.undo()


def test_mnist_without_3s_keeps_every_test_digit_and_normalises_with_its_statistics(mnist_env):
    full_train, full_test = load_splits(compose_config(["dataset=mnist"]).dataset)
    # the config's constants are the training set's pixel statistics (pytorch/examples' 0.1307 / 0.3081)
    pixels = full_train.images.float() / 255
    assert round(pixels.mean().item(), 4) == 0.1307 and round(pixels.std().item(), 4) == 0.3081
    cfg = compose_config(["dataset=mnist", "dataset.exclude_train_classes=[3]", "trainer.eval_batch_size=2500"])
    data = prepare_data(cfg.dataset, cfg.trainer, CPU)
    keep = full_train.labels != 3
    assert len(data.train) == 60000 - 6131 and torch.equal(data.train.labels, full_train.labels[keep])
    assert torch.equal(data.train.images, full_train.images[keep])
    assert torch.equal(data.test.images, full_test.images) and (data.test.labels == 3).sum() == 1010
    first = next(iter(data.test_loader.epoch()))
    assert torch.equal(first.inputs, _normalise(full_test.images[:2500], (0.1307,), (0.3081,)))
