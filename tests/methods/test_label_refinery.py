"""label_refinery (hessamb/label-refinery): the student learns the refinery's (teacher's) softmax on each crop, the
label unused; the refinery runs in train mode as in the code; generations chain through teacher.distill."""
from __future__ import annotations

import math

import pytest
import torch

from kdbench.distill import create_method
from kdbench.losses import kd_loss
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair, resolve_job
from tests.helpers import assert_no_teacher_grad, close, forward, method_options, np_softmax, rand64

SMALL_IMAGES = ["dataset.image_shape=[3,16,16]"]


def test_refinery_loss_is_the_batch_mean_cross_entropy_to_the_refinerys_softmax():
    from kdbench.methods.label_refinery import refinery_loss

    zs, zt = rand64(4, 6, seed=1, scale=2.0), rand64(4, 6, seed=2, scale=2.0)
    want = 0.0
    for n in range(4):
        p, q = np_softmax(zt.numpy()[n]), np_softmax(zs.numpy()[n])
        want += -sum(p[c] * math.log(q[c]) for c in range(6)) / 4
    close(refinery_loss(zs, zt), want)


def test_refinery_loss_differs_from_kl_only_by_the_refinerys_entropy():
    from kdbench.methods.label_refinery import refinery_loss

    zs, zt = rand64(3, 5, seed=3), rand64(3, 5, seed=4)
    p = torch.softmax(zt, 1)
    entropy = float(-(p * p.log()).sum(1).mean())
    close(refinery_loss(zs, zt) - kd_loss(zs, zt, 1.0), entropy)


def test_no_gradient_reaches_the_refinery():
    pair = make_pair("resnet14", "resnet8", input_shape=(3, 16, 16))
    method = create_method(method_options("label_refinery"), pair)
    s, t = forward(pair, method, n=4, shape=(3, 16, 16))
    total, terms = method.loss(make_batch(4, 10), s, t, 1)
    assert set(terms) == {"ce", "refinery"} and float(total.detach()) == float(terms["refinery"].detach())
    assert_no_teacher_grad(total, *t.values())


def test_the_refinery_runs_in_train_mode_by_default_and_in_eval_mode_on_request(benchmark_pair):
    on = create_method(method_options("label_refinery"), benchmark_pair)
    off = create_method(method_options("label_refinery", teacher_train_mode=False), benchmark_pair)
    assert on.teacher_train_mode is True and off.teacher_train_mode is False
    assert on.record_fields()["refinery_mode"] == "train" and off.record_fields()["refinery_mode"] == "eval"
    assert count_parameters(on) == 0


def test_a_label_refinery_job_learns_from_its_refinery(run_job, tmp_path):
    from kdbench.models import create_model

    torch.manual_seed(0)
    ckpt = tmp_path / "refinery.pt"
    torch.save({"model": create_model("resnet14", num_classes=10, input_shape=(3, 16, 16)).state_dict()}, ckpt)
    rec = run_job(*TINY_SYNTHETIC, *SMALL_IMAGES, "teacher=resnet14", "student=resnet8", "method=label_refinery",
                  f"teacher.checkpoint={ckpt}")
    assert rec["status"] == "completed" and rec["teacher"] == "resnet14" and rec["teacher_cache"] is False
    assert set(rec["history"][0]["train"]) == {"loss", "ce", "refinery"} and rec["refinery_mode"] == "train"


def test_the_generation_experiment_chains_each_generation_to_the_previous_one(tmp_path):
    job = resolve_job(["experiment=label_refinery_cifar100"], tmp_path)
    assert job.labels["method"] == "label_refinery" and job.labels["teacher"] == "resnet56_gen2"
    gen2 = job.teacher.job
    assert gen2.labels["method"] == "label_refinery" and gen2.labels["student"] == "resnet56_gen2"
    gen1 = gen2.teacher.job
    assert gen1.labels["method"] == "vanilla" and gen1.labels["student"] == "resnet56" and gen1.teacher is None


@pytest.mark.slow
@pytest.mark.parametrize("teacher, student", [("resnet32x4", "resnet8x4"), ("vgg13", "MobileNetV2")])
def test_label_refinery_jobs_run_the_benchmark_and_a_cross_architecture_pair(run_job, tmp_path, teacher, student):
    from kdbench.models import create_model

    torch.manual_seed(0)
    ckpt = tmp_path / f"{teacher}.pt"
    torch.save({"model": create_model(teacher, num_classes=10, input_shape=(3, 32, 32)).state_dict()}, ckpt)
    rec = run_job(*TINY_SYNTHETIC, f"teacher={teacher}", f"student={student}", "method=label_refinery",
                  f"teacher.checkpoint={ckpt}")
    assert rec["status"] == "completed" and rec["teacher"] == teacher and rec["extra_params"] == 0
