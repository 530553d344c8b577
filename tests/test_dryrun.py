"""Dry runs: per-job plans and sweep totals without data or training (CIFAR is not needed to plan a CIFAR sweep)."""
import json
import os
import subprocess
import sys

from kdbench.data import planned_train_size
from kdbench.plan import format_job, forward_flops, plan_job, sweep_totals, teachers_to_train
from tests.conftest import KDBENCH, compose_config, resolve_job



def test_forward_flops_match_a_hand_count():
    # FlopCounterMode counts a Linear as its matmul, 2 * in * out per sample (bias adds and ReLUs are not counted).
    job = resolve_job(["student=mlp_32", "student.model.hidden=[48,24]"])  # digits: 8x8 inputs, 10 classes
    assert forward_flops(job.student, job.dataset) == 2 * (64 * 48 + 48 * 24 + 24 * 10)


def test_cifar100_plan_needs_no_data(tmp_path):
    job = resolve_job(["dataset=cifar100", "teacher=resnet32x4", "student=resnet8x4", "method=kd",
                       f"paths.data_dir={tmp_path / 'no-data'}"], tmp_path)
    plan = plan_job(job)
    student, teacher = forward_flops(job.student, job.dataset), forward_flops(job.teacher.model, job.dataset)
    assert plan["labels"] == {"dataset": "cifar100", "teacher": "resnet32x4", "student": "resnet8x4", "method": "kd"}
    assert (plan["samples"], plan["epochs"]) == (50_000, 240)
    # augmented inputs: no per-sample cache; KD reads only logits, and 240 epochs outnumber the 162 views, so the
    # view cache is built first (one teacher forward per view) and then read instead of the teacher
    assert plan["flops"] == 3 * student * 50_000 * 240 + teacher * 50_000 * 162
    assert plan["teacher_view_cache"]["state"] == "build" and plan["teacher_view_cache"]["bytes"] == 50_000 * 162 * 400
    live = plan_job(resolve_job(["dataset=cifar100", "teacher=resnet32x4", "student=resnet8x4", "method=kd",
                                 "trainer.teacher_view_cache=off"], tmp_path))
    assert live["flops"] == 3 * student * 50_000 * 240 + teacher * 50_000 * 240  # the teacher every epoch
    assert plan["teacher"]["source"] == "train" and plan["teacher"]["key"] == job.teacher.entry
    (to_train,) = teachers_to_train(plan)
    assert to_train["method"] == "vanilla" and to_train["flops"] == 3 * teacher * 50_000 * 240
    assert list(tmp_path.iterdir()) == []  # neither data nor a teacher store entry was touched


def test_methods_that_pass_rotations_or_partners_are_planned_with_those_passes(tmp_path):
    """SSKD runs student and teacher on 4 rotations of each image (the teacher live: its views are not cached);
    SLA+SD the student on 4 rotations; CS-KD adds a forward (no backward) of each anchor's partner."""
    base = ["dataset=cifar100", "teacher=resnet32x4", "student=resnet8x4", f"paths.data_dir={tmp_path / 'none'}"]
    job = resolve_job([*base, "method=sskd"], tmp_path)
    student, teacher = forward_flops(job.student, job.dataset), forward_flops(job.teacher.model, job.dataset)
    assert plan_job(job)["flops"] == 4 * 3 * student * 50_000 * 240 + 4 * teacher * 50_000 * 240
    assert plan_job(resolve_job([*base, "method=sla_sd"], tmp_path))["flops"] == 4 * 3 * student * 50_000 * 240
    assert plan_job(resolve_job([*base, "method=cs_kd"], tmp_path))["flops"] == (3 + 1) * student * 50_000 * 240


def test_cached_teacher_excluded_classes_and_teacher_recipe():
    job = resolve_job(["experiment=hinton_mnist_no3", "seed=1"])
    plan = plan_job(job)
    student, teacher = forward_flops(job.student, job.dataset), forward_flops(job.teacher.model, job.dataset)
    assert plan["samples"] == 54_000 and plan["teacher"]["cached"]  # no 3s: 9/10 of MNIST; no augmentation
    assert plan["flops"] == 3 * student * 54_000 * 40 + teacher * 54_000
    training = plan["teacher"]["training"]  # the teacher's recipe: all 60,000 digits, jittered, 60 epochs
    assert (training["samples"], training["epochs"], training["flops"]) == (60_000, 60, 3 * teacher * 60_000 * 60)
    assert planned_train_size(compose_config(["dataset=mnist", "dataset.train_size=1000"]).dataset) == 1000


def test_shared_teacher_counted_once(tmp_path):
    jobs = [[f"method={method}", f"seed={seed}"] for method in ("vanilla", "kd") for seed in (1, 2)]
    plans = [plan_job(resolve_job(job, tmp_path)) for job in jobs]
    totals = sweep_totals(plans)
    (teacher,) = totals["teachers"]
    assert teacher["label"] == "mlp_1200x2" and totals["jobs"] == 4
    assert totals["flops"] == sum(p["flops"] for p in plans) + teacher["flops"]


def test_stored_teacher_is_detected(tmp_path):
    job = resolve_job(["method=kd"], tmp_path)
    entry = tmp_path / "teachers" / job.teacher.entry
    entry.mkdir(parents=True)
    (entry / "meta.json").write_text("{}")
    plan = plan_job(job)
    assert plan["teacher"]["source"] == "store" and teachers_to_train(plan) == []
    assert "teacher mlp_1200x2: in store" in format_job(plan, 10.0)


def test_takd_chain_trains_deepest_teacher_first(tmp_path):
    job = resolve_job(["experiment=takd_cifar100", "pair=plain_cnn_10_c100-plain_cnn_4_c100-plain_cnn_2_c100",
                       "method=kd"], tmp_path)
    plan = plan_job(job)
    assert [(t["label"], t["method"]) for t in teachers_to_train(plan)] == [
        ("plain_cnn_10_c100", "vanilla"), ("plain_cnn_4_c100_ta", "kd")]
    big = tmp_path / "teachers" / job.teacher.job.teacher.entry
    big.mkdir(parents=True)
    (big / "meta.json").write_text("{}")
    plan = plan_job(job)
    assert [t["label"] for t in teachers_to_train(plan)] == ["plain_cnn_4_c100_ta"]
    assert "plain_cnn_10_c100 (in store) -> plain_cnn_4_c100_ta (kd, 160 ep)" in format_job(plan, 10.0)


def test_dry_run_settings_do_not_change_store_keys():
    """A dry run must find the entries real runs store."""
    dry, real = resolve_job(["method=kd", "dry_run=true", "dry_run_tflops=5"]), resolve_job(["method=kd"])
    assert dry.teacher.entry == real.teacher.entry and dry.key == real.key


def test_cli_dry_run_lists_jobs_and_totals_and_writes_no_records(tmp_path):
    out = subprocess.run([*KDBENCH, "dry_run=true"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "KDBENCH_RESULTS": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "#0 digits | - | mlp_32 | vanilla  seed 1  30 ep " in out.stdout
    assert "#5 digits | mlp_1200x2 | mlp_32 | kd  seed 3  30 ep " in out.stdout
    assert out.stdout.count("teacher mlp_1200x2: not in store, trained first: mlp_1200x2 (vanilla, 30 ep)") == 3
    assert "dry run: 6 jobs, 1 teacher(s) to train first, total " in out.stdout
    (sweep,) = (tmp_path / "multirun").iterdir()
    assert sorted(json.loads(p.read_text())["job"] for p in sweep.glob("*/plan.json")) == list(range(6))
    assert not list(tmp_path.rglob("metrics.json")) and not (tmp_path / "teachers").exists()
    assert "leaderboard" not in out.stdout and not list(sweep.glob("leaderboard.*"))
