"""pad (Zhang et al. ECCV 2020, torchdistill PADL2Loss): the embedding L2 weighted by the student's predicted
per-dimension log-variance, plus that log-variance."""
from __future__ import annotations

import math

import pytest
import torch

from kdbench.distill import create_method
from kdbench.models import count_parameters
from tests.conftest import make_batch, make_pair
from tests.helpers import assert_no_teacher_grad, close, forward, method_options, rand64
from tests.methods.feature_helpers import one_epoch, teacher_checkpoints  # noqa: F401  (fixture)


def test_pad_l2_is_the_mean_over_samples_and_dimensions_of_the_variance_weighted_square_plus_the_log_variance():
    from kdbench.methods.pad import pad_l2_loss

    s, t, v = rand64(3, 4, seed=1), rand64(3, 4, seed=2), rand64(3, 4, seed=3, scale=0.5)
    eps = 1e-6
    expected = sum((t[n, d].item() - s[n, d].item()) ** 2 / (eps + math.exp(v[n, d].item())) + v[n, d].item()
                   for n in range(3) for d in range(4)) / 12
    close(pad_l2_loss(s, t, v, eps), expected)


def test_a_large_predicted_variance_down_weights_a_sample():
    from kdbench.methods.pad import pad_l2_loss

    s, t = torch.zeros(2, 1, dtype=torch.float64), torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    tight = pad_l2_loss(s, t, torch.zeros(2, 1, dtype=torch.float64))
    loose = pad_l2_loss(s, t, torch.tensor([[0.0], [2.0]], dtype=torch.float64))
    close(tight, 1 / (1 + 1e-6))
    close(loose, (1 / (1 + 1e-6) + 1 / (1e-6 + math.exp(2)) + 2) / 2)


def test_the_variance_branch_is_a_linear_and_batchnorm_on_the_student_embedding(benchmark_pair):
    m = create_method(method_options("pad"), benchmark_pair)
    assert count_parameters(m) == 256 * 256 + 256 + 2 * 256 == 66_304  # Linear(256, 256) + BatchNorm1d(256)
    assert m.projector is None
    s, t = forward(benchmark_pair, m, n=4)
    terms = m.all_terms(make_batch(4, 100, (3, 32, 32)), s, t)
    assert set(terms) == {"ce", "pad_l2"}
    from kdbench.methods.pad import pad_l2_loss
    close(terms["pad_l2"], float(pad_l2_loss(s["embedding"], t["embedding"], m.var_estimator(s["embedding"])).detach()))


def test_unequal_widths_get_a_projector_and_the_variance_of_the_teacher_width():
    pair = make_pair("wrn_40_2", "wrn_40_1", 10, (3, 16, 16))  # embeddings 128 and 64
    m = create_method(method_options("pad"), pair)
    assert m.projector.in_features == 64 and m.projector.out_features == 128
    assert m.var_estimator[0].out_features == 128
    s, t = forward(pair, m, n=4, shape=(3, 16, 16))
    assert torch.isfinite(m.all_terms(make_batch(4, 10), s, t)["pad_l2"])


def test_no_gradient_reaches_the_teacher_and_the_variance_branch_gets_one():
    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    m = create_method(method_options("pad"), pair)
    s, t = forward(pair, m, n=4, shape=(3, 16, 16))
    loss = m.all_terms(make_batch(4, 10), s, t)["pad_l2"]
    assert_no_teacher_grad(loss, *t.values())
    assert m.var_estimator[0].weight.grad is not None


def test_pad_refuses_a_pair_without_a_teacher():
    from kdbench.errors import IncompatibleModels

    with pytest.raises(IncompatibleModels, match="'pad'"):
        create_method(method_options("pad"), make_pair(None, "resnet8"))


@pytest.mark.slow
def test_pad_job_runs_resnet32x4_to_resnet8x4(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "pad", "resnet32x4", "resnet8x4")
    assert record["status"] == "completed" and record["extra_params"] == 66_304
    assert set(record["history"][0]["train"]) == {"loss", "ce", "pad_l2"}
    assert record["trained_heads"] == ["var_estimator"]


@pytest.mark.slow
def test_pad_job_runs_the_cross_architecture_pair_vgg13_to_mobilenetv2(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "pad", "vgg13", "MobileNetV2")
    assert record["status"] == "completed" and record["trained_heads"] == ["var_estimator", "projector"]
