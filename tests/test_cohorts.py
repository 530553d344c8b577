"""Cohorts (kdbench.cohort): jobs that see the same batches train together, one teacher forward per batch, and each
member's record is the one it writes alone, epoch for epoch, bit for bit (CPU, deterministic mode)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from kdbench.cohort import alone_reason, cohort_key, group, run_cohort
from kdbench.distill import Method, register_method
from kdbench.job import run
from kdbench.losses import kd_loss
from tests.conftest import kdbench_cli, resolve_job

BASE = ["dataset=synthetic", "dataset.num_classes=10", "dataset.train_size=64", "dataset.test_size=32",
        "trainer.batch_size=16", "trainer.epochs=2", "trainer.progress=false", "trainer.deterministic=true",
        "teacher=resnet8", "student=resnet8", "seed=3"]
# the members: KD, DKD, CRD (its own negatives), AT, FitNet, a method with a pre-training stage (AB), and a
# student with dropout (its own RNG stream)
MEMBERS = {"kd": ["method=kd"], "dkd": ["method=dkd"], "crd": ["method=crd"], "at": ["method=at"],
           "fitnet": ["method=fitnet"], "ab": ["method=ab", "method.stage_epochs=1"],
           "kd_dropout": ["method=kd", "student=probe_net"]}


@register_method("test_fails_in_epoch_2")
class FailsInEpoch2(Method):
    """KD, except that it raises in epoch 2 while KDBENCH_TEST_FAIL is set (a member that breaks mid-run)."""

    epoch_now = 0

    def terms(self, batch, student, teacher):
        if self.epoch_now == 2 and os.environ.get("KDBENCH_TEST_FAIL"):
            raise RuntimeError("member broke in epoch 2")
        return {"kd": kd_loss(student["logits"], teacher["logits"], 4.0)}

    def term_weights(self, epoch: int) -> dict:
        self.epoch_now = epoch
        return super().term_weights(epoch)


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    from kdbench.models import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet8.pt"
    torch.save({"model": create_model("resnet8", num_classes=10, input_shape=(3, 32, 32)).state_dict()}, path)
    return path


def _job(tmp_path, teacher_checkpoint, extra):
    return resolve_job([*BASE, f"teacher.checkpoint={teacher_checkpoint}", *extra], tmp_path)


def _same(a: dict, b: dict) -> None:
    """Two records' histories, epoch by epoch, apart from wall-clock seconds."""
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    assert a["last_class_errors"] == b["last_class_errors"]


@pytest.mark.slow  # ~40 s: seven jobs twice
def test_each_cohort_member_writes_the_record_it_writes_alone_bit_for_bit(tmp_path, teacher_checkpoint):
    jobs = {name: _job(tmp_path, teacher_checkpoint, extra) for name, extra in MEMBERS.items()}
    assert len({cohort_key(j) for j in jobs.values()}) == 1 and group(list(jobs.values())) == [list(range(7))]
    alone = {name: run(job, tmp_path / "alone" / name) for name, job in jobs.items()}
    together = run_cohort([(job, tmp_path / "cohort" / name) for name, job in jobs.items()])
    for (name, solo), member in zip(alone.items(), together):
        assert member["status"] == "completed", name
        _same(solo, member)
    assert json.loads((tmp_path / "cohort" / "ab" / "metrics.json").read_text())["status"] == "completed"
    ckpt = torch.load(tmp_path / "cohort" / "crd" / "checkpoint.pt", weights_only=False)
    solo_ckpt = torch.load(tmp_path / "alone" / "crd" / "checkpoint.pt", weights_only=False)
    assert torch.equal(ckpt["method"]["bank_s"], solo_ckpt["method"]["bank_s"])  # CRD's negatives were its own


def test_a_failing_member_is_recorded_and_the_others_finish_then_it_resumes_beside_a_new_member(
        tmp_path, teacher_checkpoint, monkeypatch):
    kd = _job(tmp_path, teacher_checkpoint, ["method=kd"])
    breaks = _job(tmp_path, teacher_checkpoint, ["method=kd", "method.name=test_fails_in_epoch_2"])
    monkeypatch.setenv("KDBENCH_TEST_FAIL", "1")
    first = run_cohort([(kd, tmp_path / "c" / "kd"), (breaks, tmp_path / "c" / "breaks")])
    assert first[0]["status"] == "completed" and isinstance(first[1], RuntimeError)
    broken = json.loads((tmp_path / "c" / "breaks" / "metrics.json").read_text())
    assert broken["status"] == "failed" and "member broke in epoch 2" in broken["error"]
    assert [e["epoch"] for e in broken["history"]] == [1]  # its first epoch is kept, with its checkpoint

    monkeypatch.delenv("KDBENCH_TEST_FAIL")
    dkd = _job(tmp_path, teacher_checkpoint, ["method=dkd"])
    second = run_cohort([(kd, tmp_path / "c" / "kd"), (breaks, tmp_path / "c" / "breaks"),
                         (dkd, tmp_path / "c" / "dkd")])
    assert second[0] == first[0]  # completed: kept as it is, not retrained
    solo_breaks = run(breaks, tmp_path / "alone" / "breaks")
    solo_dkd = run(dkd, tmp_path / "alone" / "dkd")
    _same(solo_breaks, second[1])  # resumed at epoch 2 while dkd started at 1: the same record as alone
    _same(solo_dkd, second[2])


def test_jobs_that_cannot_share_batches_or_a_train_mode_teacher_run_alone_and_say_why(tmp_path, teacher_checkpoint):
    cs_kd = resolve_job([*BASE, "method=cs_kd"], tmp_path)
    ofd = _job(tmp_path, teacher_checkpoint, ["method=ofd", "method.teacher_train_mode=true"])
    kd = _job(tmp_path, teacher_checkpoint, ["method=kd"])
    other_seed = _job(tmp_path, teacher_checkpoint, ["method=kd", "seed=4"])
    assert "draws its own batches" in alone_reason(cs_kd) and cohort_key(cs_kd) is None
    assert "teacher in train mode" in alone_reason(ofd)
    assert alone_reason(kd) is None and cohort_key(kd) != cohort_key(other_seed)
    assert group([kd, cs_kd, other_seed, ofd, kd]) == [[0, 4], [1], [2], [3]]


def test_members_may_differ_in_student_optimizer_and_schedule_but_not_in_what_makes_the_batches(tmp_path,
                                                                                             teacher_checkpoint):
    key = cohort_key(_job(tmp_path, teacher_checkpoint, ["method=kd"]))
    for same in (["method=dkd"], ["student=resnet14"], ["optim.lr=0.01"], ["schedule=cosine"],
                 ["trainer.progress=true"]):
        assert cohort_key(_job(tmp_path, teacher_checkpoint, ["method=kd", *same])) == key, same
    for other in (["trainer.batch_size=8"], ["trainer.epochs=3"], ["dataset.hflip=false"],
                  ["trainer.precision=bf16"]):
        assert cohort_key(_job(tmp_path, teacher_checkpoint, ["method=kd", *other])) != key, other
    assert cohort_key(resolve_job([*BASE, "method=kd"], tmp_path)) != key  # the stored teacher, not the checkpoint


def test_the_cohort_launcher_trains_a_sweep_and_its_dry_run_lists_the_cohorts(tmp_path):
    args = ["hydra/launcher=cohort", "method=kd,dkd,cs_kd", "seed=1", "trainer.epochs=2", "trainer.progress=false",
            "++teacher.recipe.trainer.epochs=2", "student=mlp_32"]
    plan = kdbench_cli(tmp_path, *args, "dry_run=true")
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "cohort of 2 (seed 1, teacher mlp_1200x2): kd/mlp_32, dkd/mlp_32" in plan.stdout
    assert "alone: cs_kd mlp_32 s1 (method cs_kd draws its own batches)" in plan.stdout
    out = kdbench_cli(tmp_path, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cohort of 2 jobs (kd, dkd)" in out.stdout
    records = {json.loads(p.read_text())["method"]: json.loads(p.read_text())
               for p in (tmp_path / "multirun").rglob("metrics.json")}
    assert {m: r["status"] for m, r in records.items()} == {"kd": "completed", "dkd": "completed",
                                                           "cs_kd": "completed"}
    assert all((Path(p).parent / ".hydra" / "overrides.yaml").exists()
               for p in (tmp_path / "multirun").rglob("metrics.json") if "teachers" not in str(p))


def test_the_teacher_runs_once_per_batch_for_the_whole_cohort(tmp_path, probe_calls):
    common = [*BASE, "teacher=probe_net", "teacher.model.tag=teacher", "++teacher.recipe.trainer.epochs=1"]
    jobs = [resolve_job([*common, *extra], tmp_path) for extra in (["method=kd"], ["method=dkd"],
                                                                    ["method=kd", "student=resnet14"])]
    run(resolve_job([*common, "method=vanilla"], tmp_path), tmp_path / "warm")  # the stored teacher, trained once
    probe_calls.clear()
    results = run_cohort([(job, tmp_path / str(i)) for i, job in enumerate(jobs)])
    assert all(r["status"] == "completed" for r in results)
    train_forwards = [c for c in probe_calls if c[0] == "teacher" and c[3] == 16]  # 64 samples / batch 16, 2 epochs
    assert len(train_forwards) == 2 * 4 and not any(training for _, training, _, _ in train_forwards)


@pytest.mark.slow  # ~40 s: submitit starts the cohort in a process of its own
def test_a_cohort_runs_as_one_submitit_job_with_the_slurm_code_path(tmp_path):
    out = kdbench_cli(tmp_path, "hydra/launcher=cohort", "hydra.launcher.executor=local",
                      "+hydra.launcher.submitit.timeout_min=30", "method=kd,dkd", "seed=1", "trainer.epochs=2",
                      "trainer.progress=false", "++teacher.recipe.trainer.epochs=2", env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").iterdir()
    assert len(list((sweep / ".submitit").iterdir())) >= 1  # one submitit job for the cohort of two
    records = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    assert sorted(r["method"] for r in records) == ["dkd", "kd"] and all(r["status"] == "completed" for r in records)
