"""The view-exact teacher-logit cache (kdbench.viewcache): every view of every training image computed once, kept in
the teacher store, gathered by (index, crop offset, flip); a run with it equals a run without it bit for bit."""
from __future__ import annotations

import json

import pytest
import torch

from kdbench import viewcache
from kdbench.errors import CorruptCheckpoint
from kdbench.job import run
from tests.conftest import kdbench_cli, resolve_job

# 66 samples in batches of 16: four full batches from the cache, the last batch of 2 is below MIN_EXACT_BATCH (live)
BASE = ["dataset=synthetic", "dataset.num_classes=10", "dataset.train_size=66", "dataset.test_size=32",
        "dataset.crop_padding=2", "trainer.batch_size=16", "trainer.epochs=2", "trainer.progress=false",
        "trainer.deterministic=true", "teacher=resnet8", "student=resnet8", "seed=2"]


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    from kdbench.models import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet8.pt"
    torch.save({"model": create_model("resnet8", num_classes=10, input_shape=(3, 32, 32)).state_dict()}, path)
    return path


def _job(tmp_path, ckpt, *extra):
    return resolve_job([*BASE, f"teacher.checkpoint={ckpt}", *extra], tmp_path)


def _history(rec):
    return [{k: v for k, v in e.items() if k != "seconds"} for e in rec["history"]]


def test_each_crop_offset_and_flip_has_its_own_view():
    p = 2
    offsets = torch.tensor([[dy, dx] for dy in range(2 * p + 1) for dx in range(2 * p + 1) for _ in (0, 1)])
    flips = torch.tensor([f for _ in range((2 * p + 1) ** 2) for f in (False, True)])
    index = viewcache.view_index(offsets, flips, p, True)
    assert sorted(index.tolist()) == list(range(viewcache.view_count(p, True))) == list(range(50))
    assert viewcache.view_count(4, True) == 162  # CIFAR: 9 x 9 crops x 2 flips


def test_a_run_with_the_view_cache_equals_the_live_teacher_bit_for_bit(tmp_path, teacher_checkpoint):
    live = run(_job(tmp_path, teacher_checkpoint, "method=kd", "trainer.teacher_view_cache=off"), tmp_path / "live")
    cached = run(_job(tmp_path, teacher_checkpoint, "method=kd", "trainer.teacher_view_cache=build"),
                 tmp_path / "cached")
    assert live["teacher_view_cache"]["state"] == "skipped" and cached["teacher_view_cache"]["state"] == "built"
    assert _history(cached) == _history(live)
    # a later job (another method, same teacher and data) finds it in the store, beside the teacher
    again = run(_job(tmp_path, teacher_checkpoint, "method=dkd", "trainer.teacher_view_cache=auto"), tmp_path / "dkd")
    alone = run(_job(tmp_path, teacher_checkpoint, "method=dkd", "trainer.teacher_view_cache=off"), tmp_path / "dkd0")
    assert again["teacher_view_cache"]["state"] == "found" and _history(again) == _history(alone)
    (meta,) = (tmp_path / "teachers").rglob("views/*.json")
    info = json.loads(meta.read_text())
    assert info["shape"] == [66, 50, 10] and info["spec"]["teacher_sha256"] == cached["teacher_source"]["sha256"]


def test_the_cached_logits_are_the_teachers_logits_of_each_view(tmp_path, teacher_checkpoint):
    """A second formulation: crop and flip by hand with torch ops, normalise, run the teacher, compare."""
    from kdbench.data import prepare_data
    from kdbench.job import obtain_teacher

    job = _job(tmp_path, teacher_checkpoint, "method=kd")
    data = prepare_data(job.dataset, job.trainer, torch.device("cpu"))
    teacher, source = obtain_teacher(job.teacher, job.teacher_store, data, torch.device("cpu"))
    spec = viewcache.spec_for(source["sha256"], job.dataset, "fp32", len(data.train))
    cache = viewcache.build(tmp_path / "entry", spec, teacher, data.train_loader, torch.no_grad, say=lambda *a, **k: None)
    raw = data.train.images[:5].float() / (255.0 if data.train.images.dtype == torch.uint8 else 1.0)
    mean = torch.tensor(job.dataset.mean).view(1, -1, 1, 1)
    std = torch.tensor(job.dataset.std).view(1, -1, 1, 1)
    padded = torch.nn.functional.pad(raw, (2, 2, 2, 2))
    for dy, dx, flip in ((0, 0, False), (4, 1, True), (2, 2, False), (3, 4, True)):
        x = padded[:, :, dy:dy + 32, dx:dx + 32]
        x = x.flip(3) if flip else x
        with torch.no_grad():
            expected = teacher((x - mean) / std)
        view = viewcache.view_index(torch.tensor([[dy, dx]]), torch.tensor([flip]), 2, True)
        torch.testing.assert_close(cache.logits[:5, int(view)], expected, rtol=1e-5, atol=1e-5)


def test_a_damaged_cache_file_is_refused_naming_the_file(tmp_path, teacher_checkpoint):
    run(_job(tmp_path, teacher_checkpoint, "method=kd", "trainer.teacher_view_cache=build", "trainer.epochs=1"),
        tmp_path / "a")
    (data_file,) = (tmp_path / "teachers").rglob("views/*.bin")
    with open(data_file, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CorruptCheckpoint, match=f"{data_file.name} is missing or does not match its recorded sha256"):
        run(_job(tmp_path, teacher_checkpoint, "method=kd", "trainer.epochs=1"), tmp_path / "b")


def test_when_the_cache_is_built_used_or_skipped():
    spec = viewcache.ViewCacheSpec("sha", {}, (0.5,), (0.25,), 4, True, "fp32", 50_000, 100)
    assert spec.views == 162 and spec.nbytes == 50_000 * 162 * 100 * 4  # ≈ 3.0 GiB, the 3.2 GB
    assert viewcache.decide("auto", spec, 240, 8.0, False)[0] == "build"  # 240 epochs > 162 views: the job gains
    assert viewcache.decide("auto", spec, 30, 8.0, False)[0] == "skip"
    assert viewcache.decide("auto", spec, 30, 8.0, True)[0] == "use"
    assert viewcache.decide("build", spec, 30, 8.0, False)[0] == "build"
    action, why = viewcache.decide("auto", spec, 240, 2.0, True)
    assert action == "skip" and "over trainer.teacher_view_cache_gb=2" in why and "live teacher" in why
    assert viewcache.decide("off", spec, 240, 8.0, True)[0] == "skip"


def test_methods_that_read_teacher_features_or_a_train_mode_teacher_do_not_use_it(tmp_path, teacher_checkpoint):
    rec = run(_job(tmp_path, teacher_checkpoint, "method=at", "trainer.teacher_view_cache=build", "trainer.epochs=1"),
              tmp_path / "at")
    assert rec["teacher_view_cache"]["state"] == "not used" and "reads teacher features" in rec["teacher_view_cache"][
        "why"]
    assert not list((tmp_path / "teachers").rglob("views/*.bin"))


def test_the_dry_run_states_the_cache_size_and_whether_it_is_built_found_or_skipped(tmp_path, teacher_checkpoint):
    out = kdbench_cli(tmp_path, *BASE, f"teacher.checkpoint={teacher_checkpoint}", "method=kd,at",
                      "trainer.teacher_view_cache=build", "dry_run=true")
    assert out.returncode == 0, out.stderr[-3000:]
    kd, at = [line for line in out.stdout.splitlines() if line.startswith("#") and "synthetic" in line]
    assert "teacher view cache: 0.1 MiB, built first (50 teacher forwards per sample" in kd
    assert "teacher view cache: not used (method at reads teacher features" in at
