"""srrl (Yang et al. 2021, as SimKD's code runs it): the student's embedding mapped to the teacher's, matched to it
(feature matching) and, through the teacher's frozen classifier, to the teacher's logits (softmax regression)."""
from __future__ import annotations

import pytest
import torch

from kdbench.distill import create_method
from kdbench.models import count_parameters
from tests.conftest import make_batch, make_pair
from tests.helpers import assert_no_teacher_grad, assert_refuses, close, forward, method_options, rand64
from tests.methods.feature_helpers import one_epoch, teacher_checkpoints  # noqa: F401  (fixture)


def test_feature_and_regression_losses_are_plain_mses():
    from kdbench.methods.srrl import srrl_feature_loss, srrl_regression_loss

    m, e_t = rand64(3, 4, seed=1), rand64(3, 4, seed=2)
    w, b, z_t = rand64(5, 4, seed=3), rand64(5, seed=4), rand64(3, 5, seed=5)
    mn, en = m.numpy(), e_t.numpy()
    close(srrl_feature_loss(m, e_t), sum((mn[n, c] - en[n, c]) ** 2 for n in range(3) for c in range(4)) / 12)
    wn, bn, zn = w.numpy(), b.numpy(), z_t.numpy()
    sq = 0.0
    for n in range(3):
        for k in range(5):
            sq += (sum(wn[k, c] * mn[n, c] for c in range(4)) + bn[k] - zn[n, k]) ** 2
    close(srrl_regression_loss(m, w, b, z_t), sq / 15)


def test_connector_is_a_bias_free_1x1_conv_bn_relu_with_66048_parameters(benchmark_pair):
    m = create_method(method_options("srrl"), benchmark_pair)
    conv, bn, relu = m.connector.transfer
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias) == (256, 256, (1, 1), None)
    assert isinstance(bn, torch.nn.BatchNorm2d) and isinstance(relu, torch.nn.ReLU)
    assert count_parameters(m) == 66_048  # methods-modern.md


def test_terms_use_the_connector_on_the_embedding_and_the_teachers_frozen_classifier(benchmark_pair):
    pair = benchmark_pair
    m = create_method(method_options("srrl"), pair)
    s, t = forward(pair, m)
    terms = m.all_terms(make_batch(2, 100, (3, 32, 32)), s, t)
    mapped = m.connector(s["embedding"])
    fc = pair.teacher.fc
    close(terms["srrl_fm"], float(((mapped - t["embedding"]) ** 2).mean().detach()))
    close(terms["srrl_sr"], float(((mapped @ fc.weight.t() + fc.bias - t["logits"]) ** 2).mean().detach()))
    assert set(terms) == {"ce", "kd", "srrl_fm", "srrl_sr"}
    assert id(m.teacher_weight) not in {id(p) for p in m.parameters()}


def test_no_gradient_reaches_the_teacher(benchmark_pair):
    m = create_method(method_options("srrl"), benchmark_pair)
    s, t = forward(benchmark_pair, m)
    terms = m.all_terms(make_batch(2, 100, (3, 32, 32)), s, t)
    assert_no_teacher_grad(terms["srrl_fm"] + terms["srrl_sr"] + terms["kd"], *t.values())


def test_srrl_serves_different_widths_with_a_wider_connector():
    pair = make_pair("ResNet50", "MobileNetV2", 100, (3, 32, 32))
    m = create_method(method_options("srrl"), pair)
    assert (m.connector.transfer[0].in_channels, m.connector.transfer[0].out_channels) == (1280, 2048)


def test_srrl_refuses_a_teacher_without_a_linear_classifier_on_its_embedding():
    from kdbench.errors import IncompatibleModels

    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    pair.teacher.fc = torch.nn.Identity()  # no Linear(64 -> 10) left
    with pytest.raises(IncompatibleModels, match="linear classifier"):
        create_method(method_options("srrl"), pair)


def test_srrl_job_trains_its_four_terms(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "srrl", "resnet14", "resnet8")
    assert record["status"] == "completed" and set(record["history"][0]["train"]) == {"loss", "ce", "kd", "srrl_fm", "srrl_sr"}


@pytest.mark.slow
def test_srrl_job_runs_resnet32x4_to_resnet8x4(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "srrl", "resnet32x4", "resnet8x4")
    assert record["status"] == "completed" and record["extra_params"] == 66_048


@pytest.mark.slow
def test_srrl_job_runs_the_cross_architecture_pair_vgg13_to_mobilenetv2(run_job, teacher_checkpoints):
    assert one_epoch(run_job, teacher_checkpoints, "srrl", "vgg13", "MobileNetV2")["status"] == "completed"
