"""itrd (Miles et al. 2022): a correlation term on batch-standardised embeddings and a mutual-information term on
trace-normalised Gram matrices."""
from __future__ import annotations

import math

import pytest
import torch

from kdbench.distill import create_method
from kdbench.models import count_parameters
from tests.conftest import make_batch, make_pair
from tests.helpers import assert_no_teacher_grad, close, forward, method_options, rand64
from tests.methods.feature_helpers import one_epoch, teacher_checkpoints  # noqa: F401  (fixture)


def _np_std_cols(x):
    n, d = len(x), len(x[0])
    cols = []
    for j in range(d):
        mean = sum(x[i][j] for i in range(n)) / n
        std = math.sqrt(sum((x[i][j] - mean) ** 2 for i in range(n)) / (n - 1))  # unbiased, no epsilon
        cols.append([(x[i][j] - mean) / std for i in range(n)])
    return cols


@pytest.mark.parametrize("alpha", [1.01, 1.5])
def test_correlation_loss_is_log2_of_summed_powered_distances_of_the_cross_correlation_to_one(alpha):
    from kdbench.methods.itrd import itrd_correlation_loss

    s, t = rand64(5, 3, seed=1), rand64(5, 3, seed=2)
    cs, ct = _np_std_cols(s.tolist()), _np_std_cols(t.tolist())
    c = [sum(cs[d][i] * ct[d][i] for i in range(5)) / 5 for d in range(3)]
    close(itrd_correlation_loss(s, t, alpha), math.log2(sum((abs(v - 1) ** 2) ** alpha for v in c)))


def test_mutual_loss_is_the_summed_difference_of_squared_trace_normalised_grams():
    from kdbench.methods.itrd import itrd_mutual_loss

    s, t = rand64(4, 3, seed=3), rand64(4, 5, seed=4)
    def rows(x):
        return [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in x.tolist()]
    a, b = rows(s), rows(t)
    gs = [[sum(a[i][k] * a[j][k] for k in range(3)) for j in range(4)] for i in range(4)]
    gt = [[sum(b[i][k] * b[j][k] for k in range(5)) for j in range(4)] for i in range(4)]
    gst = [[gs[i][j] * gt[i][j] for j in range(4)] for i in range(4)]
    tr_s, tr_st = sum(gs[i][i] for i in range(4)), sum(gst[i][i] for i in range(4))
    expected = sum((gs[i][j] / tr_s) ** 2 - (gst[i][j] / tr_st) ** 2 for i in range(4) for j in range(4))
    close(itrd_mutual_loss(s, t), expected)


def test_mutual_term_embeds_the_student_only_when_widths_differ(benchmark_pair):
    from kdbench.methods.itrd import itrd_correlation_loss, itrd_mutual_loss

    m = create_method(method_options("itrd"), benchmark_pair)  # 256 -> 256: mutual on the raw student embedding
    assert not m.embed_mutual and count_parameters(m) == 65_792
    s, t = forward(benchmark_pair, m, n=4)
    terms = m.all_terms(make_batch(4, 100, (3, 32, 32)), s, t)
    close(terms["itrd_mutual"], float(itrd_mutual_loss(s["embedding"], t["embedding"]).detach()))
    close(terms["itrd_corr"], float(itrd_correlation_loss(m.embed(s["embedding"]), t["embedding"], 1.01).detach()))
    assert set(terms) == {"ce", "itrd_corr", "itrd_mutual"}  # no KL term
    wide = create_method(method_options("itrd"), make_pair("wrn_40_2", "wrn_40_1", 100, (3, 32, 32)))  # 64 -> 128
    assert wide.embed_mutual


def test_std_eps_keeps_a_constant_feature_finite():
    from kdbench.methods.itrd import itrd_correlation_loss

    s = rand64(4, 3, seed=5)
    s[:, 1] = 2.0
    t = rand64(4, 3, seed=6)
    assert torch.isnan(itrd_correlation_loss(s, t, 1.01))  # the reference's behaviour
    assert torch.isfinite(itrd_correlation_loss(s, t, 1.01, eps=1e-6))


def test_no_gradient_reaches_the_teacher():
    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    m = create_method(method_options("itrd"), pair)
    s, t = forward(pair, m, n=4, shape=(3, 16, 16))
    terms = m.all_terms(make_batch(4, 10), s, t)
    assert_no_teacher_grad(terms["itrd_corr"] + terms["itrd_mutual"], *t.values())


def test_itrd_job_trains_ce_and_both_itrd_terms(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "itrd", "resnet14", "resnet8")
    assert record["status"] == "completed"
    assert set(record["history"][0]["train"]) == {"loss", "ce", "itrd_corr", "itrd_mutual"}


# An untrained teacher has pooled channels that are 0 for every image (dead ReLUs): their batch std is 0 and the
# reference's correlation term is NaN; std_eps keeps these plumbing runs finite.
@pytest.mark.slow
def test_itrd_job_runs_resnet32x4_to_resnet8x4(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "itrd", "resnet32x4", "resnet8x4", "method.std_eps=1e-6")
    assert record["status"] == "completed" and record["extra_params"] == 65_792


@pytest.mark.slow
def test_itrd_job_runs_the_cross_architecture_pair_vgg13_to_mobilenetv2(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "itrd", "vgg13", "MobileNetV2", "method.std_eps=1e-6")
    assert record["status"] == "completed"
