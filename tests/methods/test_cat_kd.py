"""cat_kd (Guo et al. 2023): class activation maps (the classifier's weights as a 1x1 conv on the pooled map),
average-pooled to R x R and matched by MSE; the teacher's classifier bias is dropped, the student's is frozen at 0."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.distill import create_method
from kdbench.models import count_parameters
from tests.conftest import make_batch, make_pair, method_config
from tests.helpers import assert_no_teacher_grad, assert_refuses, close, forward, method_options, np_block_pool, rand64
from tests.methods.feature_helpers import one_epoch, teacher_checkpoints  # noqa: F401  (fixture)


def test_class_activation_maps_are_the_classifier_weights_applied_per_position():
    from kdbench.methods.cat_kd import class_activation_maps

    f, w = rand64(2, 3, 2, 2, seed=1), rand64(4, 3, seed=2)
    got = class_activation_maps(f, w).numpy()
    fn, wn = f.numpy(), w.numpy()
    for n in range(2):
        for k in range(4):
            for i in range(2):
                for j in range(2):
                    close(got[n, k, i, j], sum(wn[k, c] * fn[n, c, i, j] for c in range(3)))


@pytest.mark.parametrize("normalize", [False, True])
def test_cat_loss_is_the_mse_of_pooled_maps_optionally_l2_normalised_per_class(normalize):
    from kdbench.methods.cat_kd import cat_loss

    s, t = rand64(2, 3, 4, 4, seed=3), rand64(2, 3, 4, 4, seed=4)
    ps, pt = np_block_pool(s.numpy(), 2), np_block_pool(t.numpy(), 2)
    if normalize:
        for x in (ps, pt):
            for n in range(2):
                for k in range(3):
                    x[n, k] /= math.sqrt((x[n, k] ** 2).sum())
    close(cat_loss(s, t, 2, normalize), ((ps - pt) ** 2).mean())


def test_cams_use_the_teachers_weight_without_its_bias_and_the_students_live_weight(benchmark_pair):
    from kdbench.methods.cat_kd import cat_loss, class_activation_maps

    pair = make_pair("resnet32x4", "resnet8x4", 100, (3, 32, 32))
    with torch.no_grad():
        pair.teacher.fc.bias.normal_()  # a bias that would change the CAMs if it were used
    m = create_method(method_options("cat_kd"), pair)
    assert torch.equal(m.teacher_weight, pair.teacher.fc.weight) and m.student_weight is pair.student.fc.weight
    s, t = forward(pair, m)
    expected = cat_loss(class_activation_maps(s["stage3"], pair.student.fc.weight),
                        class_activation_maps(t["stage3"], pair.teacher.fc.weight), 2, False)
    close(m.all_terms(make_batch(2, 100, (3, 32, 32)), s, t)["cat"], float(expected.detach()))
    # GAP of the teacher's CAMs = its logits without the bias
    torch.testing.assert_close(class_activation_maps(t["stage3"], m.teacher_weight).mean((2, 3)),
                               t["logits"] - pair.teacher.fc.bias)


def test_the_student_classifier_bias_is_zeroed_and_frozen_unless_kept():
    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    with torch.no_grad():
        pair.student.fc.bias.fill_(0.3)
    create_method(method_options("cat_kd"), pair)
    assert not pair.student.fc.bias.requires_grad and torch.count_nonzero(pair.student.fc.bias) == 0
    kept = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    create_method(method_options("cat_kd", student_fc_bias=True), kept)
    assert kept.student.fc.bias.requires_grad


def test_the_student_classifier_weight_is_trained_by_the_cat_term():
    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    m = create_method(method_options("cat_kd"), pair)
    s, t = forward(pair, m, shape=(3, 16, 16))
    m.all_terms(make_batch(2, 10), s, t)["cat"].backward()
    assert pair.student.fc.weight.grad is not None and pair.student.fc.weight.grad.abs().sum() > 0
    assert count_parameters(m) == 0


def test_a_wrn_teacher_cam_is_made_from_relu_of_its_final_bn():
    pair = make_pair("wrn_40_2", "wrn_16_2", 100, (3, 32, 32))
    m = create_method(method_options("cat_kd"), pair)
    assert m.teacher_taps == ("stage3_pre",) and m.t_relu and m.student_taps == ("stage3_pre",)


def test_per_pair_configs_are_the_references(benchmark_pair):
    table = {("resnet32x4", "resnet8x4"): (15.0, 2, False), ("resnet32x4", "ShuffleV1"): (600.0, 4, True),
             ("resnet32x4", "ShuffleV2"): (600.0, 4, True), ("resnet56", "resnet20"): (0.7, 2, False),
             ("resnet110", "resnet32"): (1.8, 2, False), ("wrn_40_2", "wrn_16_2"): (12.0, 2, False),
             ("wrn_40_2", "wrn_40_1"): (1.5, 2, False), ("wrn_40_2", "ShuffleV1"): (80.0, 4, True),
             ("vgg13", "vgg8"): (4.5, 2, False), ("vgg13", "MobileNetV2"): (15.0, 2, True),
             ("ResNet50", "MobileNetV2"): (40.0, 2, True), ("resnet56", "resnet8"): (15.0, 2, False)}
    for (teacher, student), (weight, resolution, normalize) in table.items():
        cfg = method_config("cat_kd", f"teacher={teacher}", f"student={student}")
        assert (float(cfg.weights.cat), cfg.cam_resolution, cfg.normalize, float(cfg.weights.ce)) == \
               (weight, resolution, normalize, 1.0), (teacher, student)


def test_no_gradient_reaches_the_teacher(benchmark_pair):
    m = create_method(method_options("cat_kd", student_fc_bias=True), benchmark_pair)
    s, t = forward(benchmark_pair, m)
    assert_no_teacher_grad(m.all_terms(make_batch(2, 100, (3, 32, 32)), s, t)["cat"], *t.values())


@pytest.mark.parametrize("teacher, student, needle", [("vgg13", "MobileNetV2", "no tap of MobileNetV2 is that map"),
                                                      ("resnet32x4", "ShuffleV2", "no tap of ShuffleV2 is that map")])
def test_cat_kd_refuses_students_whose_pooled_map_has_no_tap(teacher, student, needle):
    assert_refuses("cat_kd", teacher, student, needle)


def test_cat_kd_job_trains_ce_and_cat_without_the_student_bias(run_job, teacher_checkpoints, tmp_path):
    record = one_epoch(run_job, teacher_checkpoints, "cat_kd", "resnet14", "resnet8")
    assert record["status"] == "completed" and set(record["history"][0]["train"]) == {"loss", "ce", "cat"}
    state = torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)["student"]
    assert torch.count_nonzero(state["fc.bias"]) == 0
    # resnet8's 83,892 parameters at 100 classes, with a 10-class classifier whose 10 biases are frozen (not counted)
    assert record["student_params"] == 83_892 - (64 * 100 + 100) + (64 * 10 + 10) - 10


@pytest.mark.slow
def test_cat_kd_job_runs_resnet32x4_to_resnet8x4(run_job, teacher_checkpoints):
    assert one_epoch(run_job, teacher_checkpoints, "cat_kd", "resnet32x4", "resnet8x4")["status"] == "completed"


@pytest.mark.slow
def test_cat_kd_job_runs_the_cross_architecture_pair_wrn_40_2_to_shufflev1(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "cat_kd", "wrn_40_2", "ShuffleV1")
    assert record["status"] == "completed" and record["config"]["method"]["cam_resolution"] == 4
