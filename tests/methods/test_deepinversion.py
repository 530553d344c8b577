"""deepinversion / adi (Yin et al., CVPR 2020): images optimised from noise to match the teacher's BatchNorm statistics
with CE, TV and l2 priors (and ADI's competition with the student), a pool of them grown on a schedule, and KD at
T 3 on the pool. Losses against explicit loops; the synthesis against a hand-run optimisation; the pool schedule."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdbench.distill import create_method
from kdbench.errors import IncompatibleModels
from kdbench.methods.deepinversion import (batch_statistics, bn_statistics_loss, competition_loss, l2_prior,
                                           total_variation_l2)
from tests.conftest import make_pair
from tests.helpers import close, method_options, rand64
from tests.methods.datafree_helpers import assert_moved, params, real_step

SMALL = (3, 8, 8)


def test_batch_statistics_are_the_per_channel_mean_and_biased_variance_over_n_h_w():
    h = rand64(3, 2, 4, 5, seed=1)
    mean, var = batch_statistics(h)
    a = h.numpy()
    for c in range(2):
        values = [a[n, c, i, j] for n in range(3) for i in range(4) for j in range(5)]
        close(mean[c], sum(values) / 60)
        close(var[c], sum((v - sum(values) / 60) ** 2 for v in values) / 60)


def test_bn_statistics_loss_sums_the_l2_distances_of_variance_and_mean_per_layer():
    stats = [(rand64(3, seed=2), rand64(3, seed=3).abs(), rand64(3, seed=4), rand64(3, seed=5).abs()),
             (rand64(2, seed=6), rand64(2, seed=7).abs(), rand64(2, seed=8), rand64(2, seed=9).abs())]
    expected = 0.0
    for m, v, rm, rv in stats:
        expected += math.sqrt(sum((float(rv[k]) - float(v[k])) ** 2 for k in range(len(m))))
        expected += math.sqrt(sum((float(rm[k]) - float(m[k])) ** 2 for k in range(len(m))))
    close(bn_statistics_loss(stats), expected)


def test_total_variation_is_the_sum_of_four_frobenius_norms_of_neighbour_differences():
    x = rand64(2, 2, 3, 4, seed=10)
    a = x.numpy()
    sums = [0.0, 0.0, 0.0, 0.0]
    for n in range(2):
        for c in range(2):
            for i in range(3):
                for j in range(4):
                    if j < 3:
                        sums[0] += (a[n, c, i, j] - a[n, c, i, j + 1]) ** 2
                    if i < 2:
                        sums[1] += (a[n, c, i, j] - a[n, c, i + 1, j]) ** 2
                    if i < 2 and j < 3:
                        sums[2] += (a[n, c, i + 1, j] - a[n, c, i, j + 1]) ** 2  # x[1:, :-1] - x[:-1, 1:]
                        sums[3] += (a[n, c, i, j] - a[n, c, i + 1, j + 1]) ** 2
    close(total_variation_l2(x), sum(math.sqrt(s) for s in sums))
    close(l2_prior(x), math.sqrt((a ** 2).sum()))


def test_competition_is_one_minus_the_clamped_js_of_the_scripts_form():
    z_s, z_t = rand64(3, 4, seed=11) * 3, rand64(3, 4, seed=12) * 3
    temp, js = 3.0, 0.0
    for i in range(3):
        p = np.exp(z_s[i].numpy() / temp) / np.exp(z_s[i].numpy() / temp).sum()
        q = np.exp(z_t[i].numpy() / temp) / np.exp(z_t[i].numpy() / temp).sum()
        m = np.clip((p + q) / 2, 0.01, 0.99)
        p, q = np.clip(p, 0.01, 0.99), np.clip(q, 0.01, 0.99)
        js += 0.5 * (m * (np.log(m) - np.log(p))).sum() / 3 + 0.5 * (m * (np.log(m) - np.log(q))).sum() / 3
    close(competition_loss(z_s, z_t, temp), 1.0 - min(max(js, 0.0), 1.0))
    close(competition_loss(z_t, z_t, temp), 1.0)  # identical predictions: JS 0


def test_the_papers_competition_form_is_one_minus_the_textbook_js_without_clamps():
    z_s, z_t = rand64(3, 4, seed=13) * 3, rand64(3, 4, seed=14) * 3
    js = 0.0
    for i in range(3):
        p = np.exp(z_s[i].numpy() / 3) / np.exp(z_s[i].numpy() / 3).sum()
        q = np.exp(z_t[i].numpy() / 3) / np.exp(z_t[i].numpy() / 3).sum()
        m = (p + q) / 2
        js += (0.5 * (p * np.log(p / m)).sum() + 0.5 * (q * np.log(q / m)).sum()) / 3
    close(competition_loss(z_s, z_t, 3.0, "paper"), 1.0 - js)
    with pytest.raises(ValueError):
        competition_loss(z_s, z_t, 3.0, "kl")


def _method(name="deepinversion", **options):
    pair = make_pair("resnet14", "resnet8", 10, SMALL, epochs=3)
    base = {"batch_size": 4, "iterations": 3, "synthesis_batch_size": 5, "synthesis_iterations": 3,
            "pool_batches": 3, "initial_batches": 1, "synthesis_every": 2}
    return pair, create_method(method_options(name, **{**base, **options}), pair)


def test_synthesis_runs_adam_on_the_images_over_the_weighted_objective_with_the_teachers_bn_statistics():
    pair, method = _method(jitter=0, synthesis_iterations=2, **{"synthesis.l2": 0.5, "synthesis.tv": 0.01})
    method.start_noise(123)
    noise = torch.Generator()
    noise.set_state(method._noise.get_state())
    images, targets = method.synthesize()
    assert torch.equal(targets, torch.arange(5) % 10)

    teacher = pair.teacher.eval()
    x = torch.randn(5, *SMALL, generator=noise).requires_grad_()
    opt = torch.optim.Adam([x], lr=0.05)
    bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    for _ in range(2):  # by hand: the BN inputs captured with hooks, each term written out
        inputs = []
        handles = [m.register_forward_hook(lambda mod, i, o: inputs.append(i[0])) for m in bns]
        z_t = teacher(x)
        for h in handles:
            h.remove()
        bn = sum(torch.linalg.vector_norm(m.running_var - i.var((0, 2, 3), unbiased=False))
                 + torch.linalg.vector_norm(m.running_mean - i.mean((0, 2, 3))) for m, i in zip(bns, inputs))
        loss = (nn.functional.cross_entropy(z_t, torch.arange(5) % 10) + 10.0 * bn
                + 0.01 * total_variation_l2(x) + 0.5 * torch.linalg.vector_norm(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(images, x.detach(), rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in teacher.parameters())


def test_adi_synthesis_competes_with_the_student_and_leaves_it_unchanged_without_gradients():
    pair, method = _method("adi", jitter=1)
    before = params(pair.student)
    method.start_noise(1)
    method.synthesize()
    assert all(torch.equal(p, b) for p, b in zip(pair.student.parameters(), before))
    assert all(p.grad is None for p in pair.student.parameters())
    assert pair.student.training  # its mode is restored after the eval-mode synthesis
    terms = method.inversion_terms(torch.randn(5, *SMALL), torch.arange(5), pair.student)
    assert set(terms) == {"ce", "bn", "tv", "l2", "competition"}


def test_the_pool_starts_with_initial_batches_and_grows_every_synthesis_every_kd_steps_up_to_pool_batches():
    pair, method = _method(iterations=7)
    step = real_step(pair, method)
    counts = []
    for batch in method.batches(None, 4):
        counts.append(method.pool_count)
        assert batch.inputs.shape == (4, *SMALL)
        method.train_step(batch, step)
    assert counts == [1, 1, 2, 2, 3, 3, 3]  # a new batch before KD steps 3 and 5; then the pool is full (3)
    di = _method(initial_batches=3, iterations=1)[1]
    list(di.batches(None, 4))
    assert di.pool_count == 3  # DeepInversion's default: the whole pool before the first step


def test_the_student_learns_kd_at_t3_on_pool_images_labelled_by_the_teacher():
    pair, method = _method()
    step = real_step(pair, method)
    before = params(pair.student)
    batch = next(iter(method.batches(None, 8)))
    total, terms = method.train_step(batch, step)
    with torch.no_grad():
        z_t = pair.teacher.eval()(batch.inputs)
    assert torch.equal(batch.targets, z_t.argmax(1))
    assert set(terms) == {"kd"} and total.item() == pytest.approx(terms["kd"].item())
    assert_moved(pair.student, before)


def test_deepinversion_refuses_a_teacher_without_batchnorm_and_unknown_synthesis_terms():
    with pytest.raises(IncompatibleModels, match="BatchNorm"):
        create_method(method_options("deepinversion"), make_pair("lenet5", "lenet5_half", 10, (1, 28, 28)))
    with pytest.raises(ValueError, match="synthesis"):
        create_method(method_options("deepinversion", **{"synthesis": {"bn": 1.0, "style": 2.0}}),
                      make_pair("resnet14", "resnet8", 10, SMALL))
