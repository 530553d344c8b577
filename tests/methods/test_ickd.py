"""ickd (Liu et al. 2021): row-normalised channel Gram matrices of the last maps, the student's first mapped to the
teacher's width by a conv + BN."""
from __future__ import annotations

import math

import pytest
import torch

from kdbench.distill import create_method
from kdbench.errors import KDBenchError
from kdbench.models import count_parameters
from tests.conftest import make_batch, make_pair
from tests.helpers import assert_no_teacher_grad, assert_refuses, close, forward, method_options, rand64
from tests.methods.feature_helpers import one_epoch, teacher_checkpoints  # noqa: F401  (fixture)


def _np_corr(f):
    """Per sample: G[i, j] = <F_i, F_j> over positions, each row divided by its L2 norm (explicit loops)."""
    n, c = f.shape[0], f.shape[1]
    flat = f.reshape(n, c, -1)
    out = []
    for b in range(n):
        g = [[float(sum(flat[b, i, p] * flat[b, j, p] for p in range(flat.shape[2]))) for j in range(c)] for i in range(c)]
        out.append([[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in g])
    return out


@pytest.mark.parametrize("normalizer, denom", [("batch", lambda c, n: c * n), ("batch_squared", lambda c, n: c * n * n)])
def test_ickd_loss_is_the_summed_squared_gram_difference_over_c_times_n_or_n_squared(normalizer, denom):
    from kdbench.methods.ickd import ickd_loss

    s, t = rand64(3, 2, 2, 3, seed=1), rand64(3, 2, 4, 4, seed=2)  # the same channels, different sizes
    gs, gt = _np_corr(s.numpy()), _np_corr(t.numpy())
    total = sum((gs[b][i][j] - gt[b][i][j]) ** 2 for b in range(3) for i in range(2) for j in range(2))
    close(ickd_loss(s, t, normalizer), total / denom(2, 3))


def test_unknown_normalizer_is_an_error():
    from kdbench.methods.ickd import ickd_loss

    with pytest.raises(KDBenchError, match="batch_squared"):
        ickd_loss(rand64(2, 2, 2, 2), rand64(2, 2, 2, 2), "mean")


def test_embed_is_a_bias_free_conv_and_bn_to_the_teachers_width_with_66048_parameters(benchmark_pair):
    m = create_method(method_options("ickd"), benchmark_pair)
    conv, bn = m.embed
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias) == (256, 256, (1, 1), None)
    assert isinstance(bn, torch.nn.BatchNorm2d) and count_parameters(m) == 66_048
    m3 = create_method(method_options("ickd", embed_kernel=3), benchmark_pair)  # torchdistill's embed
    assert m3.embed[0].kernel_size == (3, 3) and m3.embed[0].padding == (1, 1)
    assert m.student_taps == m.teacher_taps == ("stage3",)


def test_cross_architecture_pairs_use_the_last_stage_of_each_and_need_no_pooling():
    pair = make_pair("vgg13", "MobileNetV2", 100, (3, 32, 32))  # 512x4x4 vs 160x2x2
    m = create_method(method_options("ickd"), pair)
    assert m.student_taps == ("stage4",) and m.teacher_taps == ("stage4",) and m.embed[0].out_channels == 512
    s, t = forward(pair, m)
    terms = m.all_terms(make_batch(2, 100, (3, 32, 32)), s, t)
    assert torch.isfinite(terms["ickd"])
    assert_no_teacher_grad(terms["ickd"], *t.values())


def test_ickd_kd_adds_hintons_kd_at_t4():
    from kdbench.losses import kd_loss

    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    m = create_method(method_options("ickd_kd"), pair)
    s, t = forward(pair, m, shape=(3, 16, 16))
    terms = m.all_terms(make_batch(2, 10), s, t)
    close(terms["kd"], float(kd_loss(s["logits"], t["logits"], 4.0).detach()))


def test_ickd_refuses_models_without_feature_maps():
    assert_refuses("ickd", "mlp_1200x2", "mlp_32", "feature maps", input_shape=(1, 28, 28))


def test_ickd_job_trains_ce_and_ickd(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "ickd", "resnet14", "resnet8")
    assert record["status"] == "completed" and set(record["history"][0]["train"]) == {"loss", "ce", "ickd"}


@pytest.mark.slow
def test_ickd_job_runs_resnet32x4_to_resnet8x4(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "ickd_kd", "resnet32x4", "resnet8x4")
    assert record["status"] == "completed" and record["method"] == "ickd_kd" and record["extra_params"] == 66_048


@pytest.mark.slow
def test_ickd_job_runs_the_cross_architecture_pair_vgg13_to_mobilenetv2(run_job, teacher_checkpoints):
    assert one_epoch(run_job, teacher_checkpoints, "ickd", "vgg13", "MobileNetV2")["status"] == "completed"
