"""Training behaviour: LR rule, resume, teacher store, and bad input that must not lose records."""
import json

import pytest
import torch

from kdbench.errors import CorruptCheckpoint, IncompatibleModels, NonFiniteLoss, OutputNotWritable
from kdbench.io import sha256_file
from kdbench.optim import lr_at
from tests.conftest import TINY_SYNTHETIC, compose_config, resolve_job

DIGITS_FAST = ["trainer.epochs=3", "trainer.progress=false", "teacher=mlp_32"]


def test_step_schedule_is_the_crd_rule():
    sched = compose_config(["schedule=step"]).schedule
    lrs = {e: lr_at(e, 0.05, sched, 240) for e in (1, 150, 151, 180, 181, 210, 211, 240)}
    assert lrs[1] == lrs[150] == 0.05
    assert lrs[151] == pytest.approx(0.005) and lrs[180] == pytest.approx(0.005)
    assert lrs[181] == pytest.approx(0.0005) and lrs[211] == pytest.approx(0.00005) == lrs[240]


def test_record_contents(run_job):
    rec = run_job(*DIGITS_FAST, "method=kd")
    assert rec["status"] == "completed" and rec["seed"] == 1 and rec["method"] == "kd"
    assert [h["epoch"] for h in rec["history"]] == [1, 2, 3]
    assert rec["best_top1"] == max(h["test_top1"] for h in rec["history"]) >= rec["last_top1"]
    assert rec["last_errors"] == round((100 - rec["last_top1"]) * rec["n_test"] / 100)
    assert {"torch", "kdbench"} <= set(rec["versions"]) and rec["config"]["trainer"]["epochs"] == 3
    assert rec["teacher_top1"] > 50 and rec["config_hash"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_interrupted_run_resumes_to_the_same_final_metrics(run_job, monkeypatch, tmp_path, precision):
    """fp16: the gradient scaler's scale and skip history are part of the checkpoint, so the resumed run skips and
    rescales as the uninterrupted one does."""
    import kdbench.job as job

    opts = [*DIGITS_FAST, f"trainer.precision={precision}"]
    reference = run_job(*opts, "method=kd", name="straight")
    real_evaluate, calls = job.evaluate, {"n": 0}

    def interrupt_in_epoch_2(model, loader, precision="fp32", logits_of=None):
        calls["n"] += 1
        if calls["n"] == 3:  # teacher eval, epoch 1, then Ctrl-C during epoch 2's evaluation
            raise KeyboardInterrupt
        return real_evaluate(model, loader, precision, logits_of)

    monkeypatch.setattr(job, "evaluate", interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_job(*opts, "method=kd", name="resumed")
    partial = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert partial["status"] == "interrupted" and len(partial["history"]) == 1
    monkeypatch.setattr(job, "evaluate", real_evaluate)
    resumed = run_job(*opts, "method=kd", name="resumed")
    assert [h["test_top1"] for h in resumed["history"]] == [h["test_top1"] for h in reference["history"]]
    assert [h["train"] for h in resumed["history"]] == [h["train"] for h in reference["history"]]
    # launching a finished job again (e.g. a whole sweep re-run to finish its stragglers) keeps its results
    again = run_job(*opts, "method=kd", name="resumed")
    assert again["status"] == "completed" and again["history"] == resumed["history"]
    assert again["last_top1"] == resumed["last_top1"] and again["last_class_errors"] == resumed["last_class_errors"]


def test_a_student_starts_from_another_runs_checkpoint_and_the_record_names_it(run_job, tmp_path):
    """student.init: the second stage of a two-stage protocol. At lr 1e-12 (0 is refused) an epoch's updates are
    below float32's resolution of the weights, and mlp_32 has no BatchNorm statistics to drift: the started student
    scores the first run's last student."""
    first = run_job(*DIGITS_FAST, "method=vanilla", name="stage1")
    init = tmp_path / "stage1" / "checkpoint.pt"
    second = run_job(*DIGITS_FAST, "method=vanilla", "trainer.epochs=1", "optim.lr=1e-12", f"student.init={init}",
                     name="stage2")
    assert second["history"][0]["test_top1"] == first["last_top1"]
    assert second["student_init"]["sha256"] == sha256_file(init)
    fresh = run_job(*DIGITS_FAST, "method=vanilla", "trainer.epochs=1", "optim.lr=1e-12", name="fresh")
    assert fresh["history"][0]["test_top1"] != first["last_top1"] and "student_init" not in fresh


def test_a_missing_or_unfitting_student_init_fails_before_any_training(run_job, tmp_path):
    from kdbench.errors import InvalidSetting

    with pytest.raises(InvalidSetting, match="student.init=.*no such file"):
        run_job(*DIGITS_FAST, "method=kd", f"student.init={tmp_path / 'nope.pt'}", name="missing")
    assert not (tmp_path / "teachers").exists()  # the error came before the teacher was trained
    other = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, other)
    with pytest.raises(IncompatibleModels, match="other.pt"):
        run_job(*DIGITS_FAST, "method=vanilla", f"student.init={other}", name="unfitting")


def test_teacher_is_trained_once_and_verified(run_job, tmp_path):
    first = run_job(*DIGITS_FAST, "method=kd", "seed=1", name="a")
    second = run_job(*DIGITS_FAST, "method=kd", "seed=2", name="b")
    assert first["teacher_source"] == second["teacher_source"]
    assert len(list((tmp_path / "teachers").iterdir())) == 1
    weights = tmp_path / "teachers" / next((tmp_path / "teachers").iterdir()).name / "teacher.pt"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CorruptCheckpoint, match="sha256"):
        run_job(*DIGITS_FAST, "method=kd", name="c")
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["status"] == "failed"


def test_teacher_from_checkpoint_file_and_corrupt_file(run_job, tmp_path):
    from kdbench.models import create_model

    good = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": create_model("mlp", 10, (1, 8, 8), hidden=[32]).state_dict()}, good)  # reference format
    rec = run_job(*DIGITS_FAST, "method=kd", f"teacher.checkpoint={good}", name="ok")
    assert rec["teacher_source"]["kind"] == "checkpoint" and len(rec["teacher_source"]["sha256"]) == 64
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptCheckpoint, match="unreadable"):
        run_job(*DIGITS_FAST, "method=kd", f"teacher.checkpoint={bad}", name="bad")
    with pytest.raises(IncompatibleModels, match="does not fit"):
        run_job(*DIGITS_FAST, "method=kd", "teacher=mlp_800x2", f"teacher.checkpoint={good}", name="mismatch")


def test_nan_loss_fails_clearly_and_keeps_the_record(run_job, tmp_path):
    with pytest.raises(NonFiniteLoss, match="optim.lr"):
        run_job(*DIGITS_FAST, "method=vanilla", "optim.lr=1e12", name="nan")
    rec = json.loads((tmp_path / "nan" / "metrics.json").read_text())
    assert rec["status"] == "failed" and "NonFiniteLoss" in rec["error"]


def test_unwritable_output_dir(tmp_path):
    from kdbench.job import run

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputNotWritable, match="paths.root"):
        run(resolve_job(DIGITS_FAST, tmp_path), blocker / "job")


def test_missing_tap_is_reported_before_training(run_job):
    from kdbench.distill import PairInfo, create_method
    from kdbench.models import create_model, probe_taps
    from omegaconf import OmegaConf

    s = create_model("resnet8", 10, (3, 32, 32))
    pair = PairInfo(s, None, probe_taps(s, (3, 32, 32)), None, "resnet8", None, 10, torch.zeros(4), 1, 0.1)
    with pytest.raises(IncompatibleModels, match="no teacher"):
        create_method(OmegaConf.create({"name": "kd", "temperature": 4, "weights": {"ce": 1, "kd": 1}}), pair)


def test_synthetic_cifar_shaped_student_learns(run_job):
    rec = run_job(*TINY_SYNTHETIC, "method=vanilla", "student=resnet8", "trainer.epochs=2")
    assert rec["status"] == "completed" and rec["student_params"] == 78_042  # resnet8 with 10 classes


def test_bf16_autocast_runs(run_job):
    rec = run_job(*DIGITS_FAST, "method=kd", "trainer.precision=bf16", "trainer.epochs=1")
    assert rec["status"] == "completed" and rec["config"]["trainer"]["precision"] == "bf16"


def test_cifar100_recipe_is_the_datasets_standard_one():
    cfg = compose_config(["dataset=cifar100"])
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.optim.lr, list(cfg.schedule.milestones)) == (240, 64, 0.05, [150, 180, 210])
    assert list(cfg.dataset.mean) == [0.5071, 0.4867, 0.4408] and cfg.dataset.crop_padding == 4 and cfg.dataset.hflip


def test_teacher_cache_gives_the_same_training_as_recomputing(run_job):
    cached = run_job(*DIGITS_FAST, "method=kd", name="cached")
    direct = run_job(*DIGITS_FAST, "method=kd", "trainer.teacher_cache=false", name="direct")
    assert cached["teacher_cache"] is True and direct["teacher_cache"] is False
    for a, b in zip(cached["history"], direct["history"]):
        assert a["train"] == pytest.approx(b["train"], rel=1e-4) and abs(a["test_top1"] - b["test_top1"]) <= 0.3
    augmented = run_job(*TINY_SYNTHETIC, "method=kd", "teacher=resnet8", "student=resnet8", name="augmented")
    assert augmented["teacher_cache"] is False  # random crops: each step's teacher output is new


def test_teacher_recipe_overrides_only_the_named_leaves():
    job = resolve_job(["+teacher.recipe.optim.lr=0.01", "+teacher.recipe.trainer.epochs=7"])
    tjob = job.teacher.job
    assert (tjob.optim.lr, tjob.optim.momentum, tjob.trainer.epochs) == (0.01, job.optim.momentum, 7)
    assert tjob.method.name == "vanilla" and tjob.student.label == job.teacher.model.label
