"""srd (Miles & Mikolajczyk 2024): a linear projector, batch-standardised features, the log of the summed fourth
powers of their difference, plus KL at T = 1."""
from __future__ import annotations

import math

import pytest
import torch

from kdbench.distill import create_method
from kdbench.models import count_parameters
from tests.conftest import make_batch, make_pair
from tests.helpers import assert_no_teacher_grad, close, forward, method_options, rand64
from tests.methods.feature_helpers import one_epoch, teacher_checkpoints  # noqa: F401  (fixture)


def _np_standardize(x, eps):
    n, d = len(x), len(x[0])
    out = [[0.0] * d for _ in range(n)]
    for j in range(d):
        mean = sum(x[i][j] for i in range(n)) / n
        var = sum((x[i][j] - mean) ** 2 for i in range(n)) / n  # biased, as BatchNorm normalises
        for i in range(n):
            out[i][j] = (x[i][j] - mean) / math.sqrt(var + eps)
    return out


@pytest.mark.parametrize("exponent", [4.0, 2.0])
def test_srd_loss_is_the_log_of_the_summed_powered_difference_of_batch_standardised_features(exponent):
    from kdbench.methods.srd import srd_loss

    s, t = rand64(4, 3, seed=1), rand64(4, 3, seed=2, scale=3.0)
    a, b = _np_standardize(s.tolist(), 1e-4), _np_standardize(t.tolist(), 1e-4)
    total = sum(abs(a[i][j] - b[i][j]) ** exponent for i in range(4) for j in range(3))
    close(srd_loss(s, t, exponent, 1e-4), math.log(total))


def test_batch_standardize_equals_a_training_mode_batchnorm1d_without_affine():
    from kdbench.methods.srd import batch_standardize

    x = rand64(6, 5, seed=3)
    bn = torch.nn.BatchNorm1d(5, eps=1e-4, affine=False).double().train()
    torch.testing.assert_close(batch_standardize(x, 1e-4), bn(x))


def test_projector_is_a_linear_with_bias_always_and_the_logit_term_is_kd_at_t1(benchmark_pair):
    from kdbench.losses import kd_loss
    from kdbench.methods.srd import srd_loss

    m = create_method(method_options("srd"), benchmark_pair)
    assert (m.projector.in_features, m.projector.out_features) == (256, 256) and m.projector.bias is not None
    assert count_parameters(m) == 65_792 and m.kd_temperature == 1.0
    s, t = forward(benchmark_pair, m)
    total, terms = m.loss(make_batch(2, 100, (3, 32, 32)), s, t, 1)
    close(terms["srd"], float(srd_loss(m.projector(s["embedding"]), t["embedding"]).detach()))
    close(terms["kd"], float(kd_loss(s["logits"], t["logits"], 1.0).detach()))
    close(total, float((terms["ce"] + 2 * terms["srd"] + terms["kd"]).detach()))


def test_no_gradient_reaches_the_teacher():
    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    m = create_method(method_options("srd"), pair)
    s, t = forward(pair, m, n=4, shape=(3, 16, 16))
    terms = m.all_terms(make_batch(4, 10), s, t)
    assert_no_teacher_grad(terms["srd"] + terms["kd"], *t.values())


def test_srd_refuses_a_model_without_an_embedding():
    from kdbench.errors import IncompatibleModels

    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    pair.student_shapes = {k: v for k, v in pair.student_shapes.items() if k != "embedding"}
    with pytest.raises(IncompatibleModels, match="embedding"):
        create_method(method_options("srd"), pair)


def test_srd_job_trains_ce_srd_and_kd(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "srd", "resnet14", "resnet8")
    assert record["status"] == "completed" and set(record["history"][0]["train"]) == {"loss", "ce", "srd", "kd"}


@pytest.mark.slow
def test_srd_job_runs_resnet32x4_to_resnet8x4(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "srd", "resnet32x4", "resnet8x4")
    assert record["status"] == "completed" and record["extra_params"] == 65_792


@pytest.mark.slow
def test_srd_job_runs_the_cross_architecture_pair_vgg13_to_mobilenetv2(run_job, teacher_checkpoints):
    assert one_epoch(run_job, teacher_checkpoints, "srd", "vgg13", "MobileNetV2")["status"] == "completed"
