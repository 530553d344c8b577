"""semckd (Chen et al. 2021): every student stage matched to every teacher stage through its own projection, weighted
per sample by an attention over teacher stages computed from batch Gram matrices."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.distill import create_method
from kdbench.errors import KDBenchError
from kdbench.models import count_parameters
from tests.conftest import make_batch, make_pair
from tests.helpers import assert_no_teacher_grad, assert_refuses, close, forward, method_options, rand64
from tests.methods.feature_helpers import one_epoch, teacher_checkpoints  # noqa: F401  (fixture)


def test_semckd_loss_is_the_attention_weighted_per_sample_mse_over_batch_and_student_levels():
    from kdbench.methods.semckd import semckd_loss

    n, l_s, l_t = 3, 2, 3
    s_values = [[rand64(n, 2, 2, 2, seed=10 * i + j) for j in range(l_t)] for i in range(l_s)]
    t_values = [[rand64(n, 2, 2, 2, seed=100 + 10 * i + j) for j in range(l_t)] for i in range(l_s)]
    att = torch.softmax(rand64(n, l_s, l_t, seed=7), -1)
    total = 0.0
    for b in range(n):
        for i in range(l_s):
            for j in range(l_t):
                d = (s_values[i][j][b] - t_values[i][j][b]).numpy().ravel()
                total += float(att[b, i, j]) * sum(x * x for x in d) / len(d)
    close(semckd_loss(s_values, t_values, att), total / (n * l_s))


def test_attention_is_a_softmax_over_teacher_levels_of_query_key_products_divided_by_soft():
    from kdbench.methods.semckd import semckd_attention

    q, k = rand64(2, 3, 4, seed=1), rand64(2, 2, 4, seed=2)
    got = semckd_attention(q, k, soft=0.5)
    for b in range(2):
        for i in range(3):
            e = [sum(float(q[b, i, d] * k[b, j, d]) for d in range(4)) / 0.5 for j in range(2)]
            z = sum(math.exp(v) for v in e)
            for j in range(2):
                close(got[b, i, j], math.exp(e[j]) / z)


def test_gram_rows_and_mlp_embed_match_numpy():
    from kdbench.methods.semckd import MLPEmbed, gram_rows

    f = rand64(3, 2, 2, 2, seed=3)
    g = gram_rows(f).numpy()
    flat = f.numpy().reshape(3, -1)
    np.testing.assert_allclose(g, flat @ flat.T, rtol=1e-12)
    torch.manual_seed(0)
    mlp = MLPEmbed(3, 2).double()
    x = torch.as_tensor(g)
    w1, b1 = mlp.linear1.weight.detach().numpy(), mlp.linear1.bias.detach().numpy()
    w2, b2 = mlp.linear2.weight.detach().numpy(), mlp.linear2.bias.detach().numpy()
    h = np.maximum(g @ w1.T + b1, 0) @ w2.T + b2
    np.testing.assert_allclose(mlp(x).detach().numpy(), h / np.sqrt((h ** 2).sum(1, keepdims=True)), rtol=1e-10)


def test_semckd_uses_every_stage_and_one_projection_per_level_pair():
    pair = make_pair("vgg13", "resnet8x4", 100, (3, 32, 32))
    m = create_method(method_options("semckd", batch_size=4), pair)
    assert m.student_taps == ("stage1", "stage2", "stage3") and m.teacher_taps == ("stage1", "stage2", "stage3", "stage4")
    assert len(m.queries) == 3 and len(m.keys) == 4 and len(m.projs) == 12
    assert [(p[0].in_channels, p[-1].out_channels) for p in m.projs[4:8]] == [(128, 128), (128, 256), (128, 512), (128, 512)]
    s, t = forward(pair, m, n=4)
    s_values, t_values, att = m.calibrate([s[k] for k in m.student_taps], [t[k] for k in m.teacher_taps])
    assert att.shape == (4, 3, 4)
    # student stage1 (64x32x32) vs teacher stage3 (512x4x4): the student map is pooled to 4x4, then projected
    assert s_values[0][2].shape == t_values[0][2].shape == (4, 512, 4, 4)
    torch.testing.assert_close(t_values[2][0], torch.nn.functional.adaptive_avg_pool2d(t["stage1"], (8, 8)))


def test_extra_parameters_on_resnet32x4_to_resnet8x4_are_the_references_minus_its_unused_mlp(benchmark_pair):
    m = create_method(method_options("semckd", batch_size=64), benchmark_pair)
    unused = 6 * ((64 * 32 + 32) + (32 * 16 + 16))  # MLPEmbed.regressor in each of the 3 query and 3 key MLPs
    assert count_parameters(m) == 10_249_280 - unused == 10_233_632


class _Step:
    epoch = 1
    teacher = None

    def __init__(self, pair):
        self.pair, self.updates = pair, 0

    def autocast(self):
        import contextlib
        return contextlib.nullcontext()

    def forward(self, x, taps):
        return self.pair.student.forward_taps(x, taps)

    def update(self, stepper, total, terms):
        self.updates += 1


def test_a_batch_smaller_than_batch_size_is_skipped_without_an_update():
    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    m = create_method(method_options("semckd", batch_size=8), pair)
    step = _Step(pair)
    total, terms = m.train_step(make_batch(5, 10), step)
    assert step.updates == 0 and terms == {} and float(total) == 0.0


def test_a_batch_larger_than_batch_size_is_an_error_naming_the_option():
    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    m = create_method(method_options("semckd", batch_size=4), pair)
    s, t = forward(pair, m, n=6, shape=(3, 16, 16))
    with pytest.raises(KDBenchError, match="batch_size"):
        m.loss(make_batch(6, 10), s, t, 1)


def test_no_gradient_reaches_the_teacher():
    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    m = create_method(method_options("semckd", batch_size=4), pair)
    s, t = forward(pair, m, n=4, shape=(3, 16, 16))
    assert_no_teacher_grad(m.all_terms(make_batch(4, 10), s, t)["semckd"], *t.values())


def test_semckd_refuses_models_without_feature_maps():
    assert_refuses("semckd", "mlp_1200x2", "mlp_32", "(C, H, W) feature maps", input_shape=(1, 28, 28))


def test_shipped_batch_size_follows_the_trainers():
    from tests.conftest import method_config

    assert method_config("semckd", "trainer.batch_size=16").batch_size == 16


def test_semckd_job_trains_its_three_terms(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "semckd", "resnet14", "resnet8")
    assert record["status"] == "completed"
    assert set(record["history"][0]["train"]) == {"loss", "ce", "kd", "semckd"}


@pytest.mark.slow
def test_semckd_job_runs_resnet32x4_to_resnet8x4_and_skips_a_short_last_batch(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "semckd", "resnet32x4", "resnet8x4", "dataset.train_size=72")
    assert record["status"] == "completed" and record["extra_params"] == 10_233_632 - 6 * (2_608 - 172)  # MLPs of width 16, not 64


@pytest.mark.slow
def test_semckd_job_runs_the_cross_architecture_pair_vgg13_to_mobilenetv2(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "semckd", "vgg13", "MobileNetV2")
    assert record["status"] == "completed" and 0 <= record["last_top1"] <= 100


def test_semckd_experiment_sizes_the_attention_mlps_by_the_recipes_batch(tmp_path):
    from tests.conftest import resolve_job

    job = resolve_job(["experiment=semckd_cifar100", "pair=wrn_40_2-MobileNetV2"], tmp_path)
    assert job.method.batch_size == job.trainer.batch_size == 64 and job.optim.lr == 0.01
    assert job.labels["method"] == "semckd" and job.teacher.job.optim.lr == 0.05
