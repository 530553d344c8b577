"""Image-folder data (ImageNet, any root/{train,val}/<class>/ tree, Tiny ImageNet), tested on tiny generated trees of
the real layouts: crops as torchvision draws them, epochs that replay whatever the workers or ranks, clear layout
errors, and a job that trains through `dataset=imagefolder` end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.v2.functional import to_pil_image

from kdbench.data.folders import FolderLoader, decode_rgb, random_resized_crop_params, scan_folder
from kdbench.distributed import World
from kdbench.errors import DataNotFound
from tests.conftest import compose_config, kdbench_cli

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _image(seed: int, h: int, w: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _save(image: torch.Tensor, path: Path) -> None:
    to_pil_image(image).save(path)


def test_decoded_files_are_the_pixels_written_and_grey_images_become_rgb(tmp_path):
    image = _image(0, 5, 7)
    _save(image, tmp_path / "a.png")
    assert torch.equal(decode_rgb(str(tmp_path / "a.png")), image)
    Image.new("L", (4, 3), color=9).save(tmp_path / "g.png")
    assert decode_rgb(str(tmp_path / "g.png")).shape == (3, 3, 4)


def make_tree(root: Path, classes=("ant", "bee", "cat"), per_class=(5, 2), size=(40, 52)) -> Path:
    """root/{train,val}/<class>/<i>.png of random images (PNG: lossless, so decoded pixels are known)."""
    seed = 0
    for split, n in zip(("train", "val"), per_class):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed += 1
                _save(_image(seed, *size), root / split / cls / f"{i}.png")
    return root


def _loader(root: Path, train: bool, **kw) -> FolderLoader:
    split = scan_folder("t", root, "train" if train else "val")
    return FolderLoader(split, 4, MEAN, STD, torch.device("cpu"), size=32, train=train, eval_resize=36, **kw)


# ----------------------------------------------------------------------------- what a batch holds


@pytest.mark.parametrize("seed", [0, 1, 7, 123])
@pytest.mark.parametrize("hw", [(40, 52), (300, 200), (64, 64)])
def test_random_resized_crops_are_the_ones_torchvision_draws_from_the_same_seed(seed, hw):
    torch.manual_seed(seed)  # torchvision draws from the global generator; ours from a seeded one of the same kind
    expected = T.RandomResizedCrop.get_params(torch.zeros(3, *hw), scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3])
    assert random_resized_crop_params(*hw, torch.Generator().manual_seed(seed)) == tuple(expected)


def test_evaluation_batches_are_resize_then_center_crop_normalised_in_class_folder_order(tmp_path):
    root = make_tree(tmp_path)
    batches = list(_loader(root, train=False).epoch(seed=3))
    x = torch.cat([b.inputs for b in batches])
    assert torch.cat([b.targets for b in batches]).tolist() == [0, 0, 1, 1, 2, 2]
    ref = T.Compose([T.Resize(36, antialias=True), T.CenterCrop(32), T.ToDtype(torch.float32, scale=True),
                     T.Normalize(MEAN, STD)])
    files = sorted((root / "val").rglob("*.png"))
    expected = torch.stack([ref(decode_rgb(str(p))) for p in files])
    assert x.shape == (6, 3, 32, 32)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)


def test_training_batches_are_the_seeded_random_resized_crop_and_flip_of_each_file(tmp_path):
    root = make_tree(tmp_path)
    loader = _loader(root, train=True)
    batch = next(iter(loader.epoch(seed=5)))
    assert batch.inputs.shape == (4, 3, 32, 32) and len(batch.crop_offsets) == 4 and batch.flips.dtype == torch.bool
    # the same sample recomputed by hand from its plan seed: torchvision's crop params, resized_crop, optional flip
    order = torch.randperm(15, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    torch.randperm(15, generator=g)
    seeds = torch.randint(0, 2**31 - 1, (15,), generator=g)[order]
    from torchvision.transforms.v2 import functional as F

    idx, s = int(order[0]), int(seeds[0])
    assert int(batch.indices[0]) == idx
    sg = torch.Generator().manual_seed(s)
    img = decode_rgb(loader.split.paths[idx])
    top, left, h, w = random_resized_crop_params(*img.shape[-2:], sg)
    crop = F.resized_crop(img, top, left, h, w, [32, 32], antialias=True)
    flip = bool(torch.rand(1, generator=sg).item() < 0.5)
    if flip:
        crop = F.horizontal_flip(crop)
    expected = (crop.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(batch.inputs[0], expected, atol=1e-5, rtol=0)
    assert batch.crop_offsets[0].tolist() == [top, left] and bool(batch.flips[0]) == flip


def test_an_epoch_replays_exactly_whatever_the_number_of_workers_and_differs_between_epochs(tmp_path):
    root = make_tree(tmp_path)
    a = list(_loader(root, train=True).epoch(seed=9))
    b = list(_loader(root, train=True, num_workers=2).epoch(seed=9))
    c = list(_loader(root, train=True).epoch(seed=10))
    assert [len(x) for x in a] == [4, 4, 4, 3]
    for x, y in zip(a, b):
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.indices, y.indices)
    assert not torch.equal(torch.cat([x.indices for x in a]), torch.cat([x.indices for x in c]))


def test_the_ranks_of_a_distributed_job_split_every_global_batch_of_the_single_process_plan(tmp_path):
    root = make_tree(tmp_path)
    single = list(_loader(root, train=True).epoch(seed=4))
    ranks = [list(_loader(root, train=True, world=World(r, 2)).epoch(seed=4)) for r in range(2)]
    for i, whole in enumerate(single):
        parts = [ranks[r][i] for r in range(2)]
        assert sorted(torch.cat([p.indices for p in parts]).tolist()) == sorted(whole.indices.tolist())
        assert sum(p.share for p in parts) == pytest.approx(1.0)
        for p in parts:  # each sample's view is the one the single process makes
            for j, index in enumerate(p.indices.tolist()):
                k = whole.indices.tolist().index(index)
                assert torch.equal(p.inputs[j], whole.inputs[k])


def test_random_resized_crops_make_a_teacher_output_cache_inexact(tmp_path):
    from kdbench.teachers import cache_is_exact

    root = make_tree(tmp_path)
    # even with flips off, a random-resized crop changes every view; evaluation views are fixed
    assert not cache_is_exact(_loader(root, train=True, hflip=False).augmented, train_mode=False)
    assert cache_is_exact(_loader(root, train=False).augmented, train_mode=False)


# ----------------------------------------------------------------------------- layouts and their errors


def test_a_tree_without_a_val_folder_or_with_other_val_classes_is_refused_naming_the_layout(tmp_path):
    root = make_tree(tmp_path / "a")
    (root / "val" / "cat").rename(root / "val" / "dog")
    with pytest.raises(DataNotFound, match=r"'val' classes differ from 'train' \(extra \['dog'\], missing \['cat'\]\)"):
        scan_folder("t", root, "val", scan_folder("t", root, "train").classes)
    with pytest.raises(DataNotFound, match=r"no 'train' folder under .*expected .*/train/<class>/<image>"):
        scan_folder("t", tmp_path / "empty", "train")


def test_imagefolder_through_the_command_line_names_a_class_count_mismatch_in_one_line(tmp_path):
    make_tree(tmp_path / "tree")
    out = kdbench_cli(tmp_path, "dataset=imagefolder", f"dataset.root={tmp_path / 'tree'}", "dataset.num_classes=4",
                      "method=vanilla", "student=mlp_32", "seed=1", "trainer.epochs=1", "trainer.progress=false")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "3 class folders in 'train' but dataset.num_classes=4" in out.stdout + out.stderr


def test_a_tiny_imagefolder_tree_trains_a_kd_job_end_to_end_through_the_command_line(tmp_path):
    make_tree(tmp_path / "tree")
    out = kdbench_cli(tmp_path, "dataset=imagefolder", f"dataset.root={tmp_path / 'tree'}", "dataset.num_classes=3",
                      "dataset.image_shape=[3,32,32]", "dataset.eval_resize=36", "method=kd", "teacher=mlp_32",
                      "student=mlp_32", "seed=1", "trainer.epochs=2", "trainer.batch_size=4",
                      "trainer.eval_batch_size=4", "trainer.progress=false", "++teacher.recipe.trainer.epochs=1",
                      "++teacher.recipe.trainer.batch_size=4")
    assert out.returncode == 0, out.stderr[-3000:]
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "multirun").rglob("metrics.json")]
    assert rec["status"] == "completed" and rec["dataset"] == "imagefolder" and len(rec["history"]) == 2
    assert 0.0 <= rec["last_top1"] <= 100.0 and "last_top5" not in rec  # top-5 needs at least 10 classes


# ----------------------------------------------------------------------------- Tiny ImageNet's own layout


def make_tiny_imagenet(data_dir: Path, wnids=("n01", "n02"), per_class=3, val=4) -> Path:
    root = data_dir / "tiny-imagenet-200"
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    seed, lines = 100, []
    for w in wnids:
        (root / "train" / w / "images").mkdir(parents=True)
        for i in range(per_class):
            seed += 1
            _save(_image(seed, 64, 64), root / "train" / w / "images" / f"{w}_{i}.JPEG")
    for i in range(val):
        seed += 1
        _save(_image(seed, 64, 64), root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[i % len(wnids)]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_tiny_imagenet_reads_its_own_validation_layout_into_uint8_tensors(tmp_path):
    from kdbench.data.datasets import load_splits

    make_tiny_imagenet(tmp_path)
    cfg = compose_config(["dataset=tiny_imagenet", f"paths.data_dir={tmp_path}", "dataset.num_classes=2"]).dataset
    train, test = load_splits(cfg)
    assert train.images.shape == (6, 3, 64, 64) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and test.labels.tolist() == [0, 1, 0, 1]


def test_tiny_imagenet_missing_its_annotations_is_one_clear_error(tmp_path):
    from kdbench.data.datasets import load_splits

    root = make_tiny_imagenet(tmp_path)
    (root / "val" / "val_annotations.txt").unlink()
    cfg = compose_config(["dataset=tiny_imagenet", f"paths.data_dir={tmp_path}"]).dataset
    with pytest.raises(DataNotFound, match="val/val_annotations.txt"):
        load_splits(cfg)


# ----------------------------------------------------------------------------- torchvision-pretrained teachers


def test_pretrained_weights_are_only_for_torchvision_models_and_never_downloaded(tmp_path, monkeypatch):
    from kdbench.errors import InvalidSetting, KDBenchError
    from kdbench.job import pretrained_file
    from tests.conftest import resolve_job

    with pytest.raises(InvalidSetting, match="only the tv_\\* models take"):
        resolve_job(["method=kd", "teacher=mlp_32", "++teacher.weights=IMAGENET1K_V1"], tmp_path)
    job = resolve_job(["method=kd", "teacher=tv_resnet34", "++teacher.weights=IMAGENET1K_V1"], tmp_path)
    assert job.teachers[0].pretrained == "IMAGENET1K_V1" and job.teachers[0].job is None  # nothing to train
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(KDBenchError, match=r"not in the torch hub cache .*resnet34-b627a593.pth"):
        pretrained_file("tv_resnet34", "IMAGENET1K_V1")
    with pytest.raises(InvalidSetting, match="no such weights for resnet34 \\(it has: IMAGENET1K_V1\\)"):
        pretrained_file("tv_resnet34", "IMAGENET1K_V9")
