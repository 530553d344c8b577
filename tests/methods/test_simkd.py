"""simkd (Chen et al. 2022): a projector onto the teacher's last map, one L2 loss, and the teacher's frozen classifier
as the evaluated head."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.distill import create_method
from kdbench.models import count_parameters
from tests.conftest import make_batch, make_pair
from tests.helpers import assert_no_teacher_grad, assert_refuses, close, forward, method_options, rand64
from tests.methods.feature_helpers import one_epoch, teacher_checkpoints  # noqa: F401  (fixture)


def test_simkd_loss_is_the_mean_squared_difference_over_every_element():
    from kdbench.methods.simkd import simkd_loss

    p, t = rand64(2, 3, 2, 2, seed=1), rand64(2, 3, 2, 2, seed=2)
    a, b = p.numpy(), t.numpy()
    total = sum((a[n, c, i, j] - b[n, c, i, j]) ** 2 for n in range(2) for c in range(3) for i in range(2) for j in range(2))
    close(simkd_loss(p, t), total / 24)


def test_reused_classifier_logits_are_the_teacher_classifier_on_the_pooled_projection():
    from kdbench.methods.simkd import reused_classifier_logits

    p, w, b = rand64(2, 3, 2, 2, seed=3), rand64(4, 3, seed=4), rand64(4, seed=5)
    got = reused_classifier_logits(p, w, b)
    pn, wn, bn = p.numpy(), w.numpy(), b.numpy()
    for n in range(2):
        pooled = [pn[n, c].sum() / 4 for c in range(3)]
        for k in range(4):
            close(got[n, k], sum(wn[k, c] * pooled[c] for c in range(3)) + bn[k])


def test_projector_is_the_bottleneck_1x1_3x3_1x1_with_214016_parameters(benchmark_pair):
    m = create_method(method_options("simkd"), benchmark_pair)
    convs = [l for l in m.projector if isinstance(l, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == [
        (256, 128, (1, 1), None), (128, 128, (3, 3), None), (128, 256, (1, 1), None)]
    assert sum(isinstance(l, torch.nn.BatchNorm2d) for l in m.projector) == 3
    assert isinstance(m.projector[-1], torch.nn.ReLU)
    assert count_parameters(m) == 214_016  # methods-modern.md: SimKD's transfer for 256 -> 256, factor 2


def test_teacher_classifier_is_a_frozen_copy_that_no_optimizer_step_moves(benchmark_pair):
    pair = benchmark_pair
    m = create_method(method_options("simkd"), pair)
    assert torch.equal(m.teacher_weight, pair.teacher.fc.weight) and torch.equal(m.teacher_bias, pair.teacher.fc.bias)
    trainable = {id(p) for p in m.trainable_parameters()}
    assert id(m.teacher_weight) not in trainable and set(dict(m.named_buffers())) >= {"teacher_weight", "teacher_bias"}
    before = m.teacher_weight.clone()
    opt = torch.optim.SGD([*pair.student.parameters(), *m.trainable_parameters()], lr=0.5)
    s, t = forward(pair, m)
    m.loss(make_batch(2, 100, (3, 32, 32)), s, t, 1)[0].backward()
    logits = m.eval_logits(pair.student, torch.randn(2, 3, 32, 32))
    logits.sum().backward()  # even a gradient through the evaluated head does not reach the frozen copy
    opt.step()
    assert torch.equal(m.teacher_weight, before) and m.teacher_weight.grad is None


@pytest.mark.parametrize("teacher, tap, relu", [("resnet32x4", "stage3", False), ("wrn_40_2", "stage3_pre", True)])
def test_target_is_the_map_the_teacher_classifier_pools(teacher, tap, relu):
    pair = make_pair(teacher, "resnet8x4", 100, (3, 32, 32))
    m = create_method(method_options("simkd"), pair)
    assert m.teacher_taps == (tap,) and m.t_relu == relu and m.student_taps == ("stage3",)
    pair.teacher.eval()
    out = pair.teacher.forward_taps(torch.randn(2, 3, 32, 32), (tap,))
    torch.testing.assert_close(m.teacher_map(out).mean((2, 3)), out["embedding"])


def test_eval_logits_run_the_projector_in_eval_mode_and_restore_its_mode(benchmark_pair):
    pair = benchmark_pair
    m = create_method(method_options("simkd"), pair)
    m.train()
    x = torch.randn(3, 3, 32, 32)
    pair.student.eval()
    logits = m.eval_logits(pair.student, x)
    assert m.training  # restored
    with torch.no_grad():
        f = pair.student.forward_taps(x, ("stage3",))["stage3"]
        h = f
        for layer in m.projector:  # eval-mode BN by hand: (x - running_mean) / sqrt(running_var + eps) * w + b
            if isinstance(layer, torch.nn.BatchNorm2d):
                h = (h - layer.running_mean[None, :, None, None]) / torch.sqrt(layer.running_var[None, :, None, None] + layer.eps)
                h = h * layer.weight[None, :, None, None] + layer.bias[None, :, None, None]
            else:
                h = layer(h)
        expected = h.mean((2, 3)) @ pair.teacher.fc.weight.t() + pair.teacher.fc.bias
    torch.testing.assert_close(logits, expected)


def test_eval_head_student_evaluates_the_students_own_classifier(benchmark_pair):
    pair = benchmark_pair
    m = create_method(method_options("simkd", eval_head="student"), pair)
    x = torch.randn(2, 3, 32, 32)
    pair.student.eval()
    torch.testing.assert_close(m.eval_logits(pair.student, x), pair.student(x))


def test_a_larger_teacher_map_is_pooled_to_the_students_size():
    pair = make_pair("vgg13", "MobileNetV2", 100, (3, 32, 32))  # teacher stage4 512x4x4, student stage4 160x2x2
    m = create_method(method_options("simkd"), pair)
    s, t = forward(pair, m)
    f_t = F.adaptive_avg_pool2d(t["stage4"], (2, 2))
    expected = float(((m.projector(s["stage4"]) - f_t) ** 2).mean().detach())
    close(m.loss(make_batch(2, 100, (3, 32, 32)), s, t, 1)[1]["simkd"], expected)


def test_no_gradient_reaches_the_teacher(benchmark_pair):
    m = create_method(method_options("simkd"), benchmark_pair)
    s, t = forward(benchmark_pair, m)
    assert_no_teacher_grad(m.all_terms(make_batch(2, 100, (3, 32, 32)), s, t)["simkd"], *t.values())


@pytest.mark.parametrize("teacher, student, needle", [
    ("MobileNetV2", "resnet8x4", "no tap of MobileNetV2 is that map"),  # a conv sits between stage4 and the pool
    ("ShuffleV2", "resnet8x4", "no tap of ShuffleV2 is that map"),
    ("mlp_1200x2", "mlp_32", "last feature map")])
def test_simkd_refuses_teachers_whose_classifier_input_is_not_a_tap(teacher, student, needle):
    shape = (1, 28, 28) if teacher.startswith("mlp") else (3, 32, 32)
    assert_refuses("simkd", teacher, student, needle, input_shape=shape)


def test_simkd_job_records_the_evaluated_head_and_trains_only_the_l2_term(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "simkd", "resnet14", "resnet8")
    assert record["status"] == "completed" and record["method"] == "simkd"
    assert record["config"]["method"]["eval_head"] == "teacher_classifier"
    assert set(record["history"][0]["train"]) == {"loss", "ce", "simkd"}
    assert record["history"][0]["train"]["loss"] == pytest.approx(record["history"][0]["train"]["simkd"], rel=1e-6)


@pytest.mark.slow
def test_simkd_job_runs_resnet32x4_to_resnet8x4(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "simkd", "resnet32x4", "resnet8x4")
    assert record["status"] == "completed" and record["extra_params"] == 214_016


@pytest.mark.slow
def test_simkd_job_runs_the_cross_architecture_pair_vgg13_to_mobilenetv2(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "simkd", "vgg13", "MobileNetV2")
    assert record["status"] == "completed" and 0 <= record["last_top1"] <= 100
