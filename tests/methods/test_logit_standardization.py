"""LSKD's logit standardisation as an option of kd and dkd (mlkd and ctkd: in their own test files): the Z-score by
hand, the standardised terms against NumPy, CE left on the raw logits, and the invariance it buys."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.distill import create_method
from kdbench.methods.common import standardize_logits
from tests.conftest import make_batch, make_pair
from tests.helpers import close, method_options, np_softmax, rand64


def np_z(z):
    return (z - z.mean()) / (1e-7 + z.std(ddof=1))


def test_standardize_logits_by_hand():
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-2.0, 0.0, 0.0, 2.0]], dtype=torch.float64)
    # row 1: mean 2.5, unbiased std sqrt(5/3); row 2: mean 0, unbiased std sqrt(8/3); eps added to the std
    s1, s2 = math.sqrt(5 / 3), math.sqrt(8 / 3)
    want = [[(v - 2.5) / (1e-7 + s1) for v in (1, 2, 3, 4)], [v / (1e-7 + s2) for v in (-2, 0, 0, 2)]]
    got = standardize_logits(z)
    for i in range(2):
        for j in range(4):
            close(got[i, j], want[i][j], 1e-12)


def test_standardize_logits_puts_the_eps_outside_the_square_root():
    z = torch.full((1, 5), 3.0, dtype=torch.float64)
    assert torch.equal(standardize_logits(z), torch.zeros_like(z))  # std 0: (z - mean) / 1e-7 = 0
    z = torch.tensor([[0.0, 1e-7]], dtype=torch.float64)  # std = 1e-7 / sqrt(2)
    close(standardize_logits(z)[0, 1], 0.5e-7 / (1e-7 + 1e-7 / math.sqrt(2)), 1e-12)


def ls_pair():
    return make_pair("resnet14", "resnet8", 10, (3, 16, 16), 40)


def test_kd_with_logit_standardization_uses_z_scores_in_kd_and_raw_logits_in_ce():
    method = create_method(method_options("kd", logit_standardization=True, temperature=2.0,
                                          **{"weights.kd": 9.0}), ls_pair())
    zs, zt = rand64(4, 10, seed=1, scale=3), rand64(4, 10, seed=2, scale=5)
    batch = make_batch(4, 10)
    total, terms = method.loss(batch, {"logits": zs}, {"logits": zt}, 1)
    kd = 0.0
    for i in range(4):
        q, p = np_softmax(np_z(zt[i].numpy()) / 2.0), np_softmax(np_z(zs[i].numpy()) / 2.0)
        kd += 4.0 * sum(q[c] * (math.log(q[c]) - math.log(p[c])) for c in range(10))
    close(terms["kd"], kd / 4)
    close(terms["ce"], float(F.cross_entropy(zs, batch.targets)))
    close(total, float((0.1 * terms["ce"] + 9.0 * terms["kd"]).detach()))


def test_kd_without_the_option_is_hintons_kd():
    from kdbench.losses import kd_loss
    method = create_method(method_options("kd"), ls_pair())
    zs, zt = rand64(4, 10, seed=3), rand64(4, 10, seed=4)
    _, terms = method.loss(make_batch(4, 10), {"logits": zs}, {"logits": zt}, 1)
    close(terms["kd"], float(kd_loss(zs, zt, 4.0)))


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_standardised_terms_ignore_an_affine_change_of_either_sides_logits(name):
    method = create_method(method_options(name, logit_standardization=True), ls_pair())
    zs, zt = rand64(5, 10, seed=5, scale=2), rand64(5, 10, seed=6, scale=2)
    batch = make_batch(5, 10)
    _, base = method.loss(batch, {"logits": zs}, {"logits": zt}, 30)
    _, moved = method.loss(batch, {"logits": 3.0 * zs - 2.0}, {"logits": 0.5 * zt + 7.0}, 30)
    for k in base:
        if k != "ce":
            close(moved[k], float(base[k]), 1e-6)  # exact but for the 1e-7 added to the std


def test_dkd_with_logit_standardization_splits_the_z_scores():
    method = create_method(method_options("dkd", logit_standardization=True, temperature=2.0), ls_pair())
    zs, zt = rand64(4, 6, seed=7, scale=3), rand64(4, 6, seed=8, scale=3)
    y = torch.tensor([0, 3, 5, 3])
    batch = make_batch(4, 6)
    batch.targets = y
    _, terms = method.loss(batch, {"logits": zs}, {"logits": zt}, 30)
    tck = nck = 0.0
    for i in range(4):
        a, b = np_z(zs[i].numpy()) / 2.0, np_z(zt[i].numpy()) / 2.0
        ps, pt = np_softmax(a), np_softmax(b)
        t = int(y[i])
        bs, bt = np.array([ps[t], 1 - ps[t]]), np.array([pt[t], 1 - pt[t]])
        tck += float((bt * np.log(bt / bs)).sum())
        keep = [c for c in range(6) if c != t]
        qs, qt = np_softmax(a[keep]), np_softmax(b[keep])
        nck += float((qt * np.log(qt / qs)).sum())
    close(terms["tckd"], 4.0 * tck / 4)
    close(terms["nckd"], 4.0 * nck / 4)
    close(terms["ce"], float(F.cross_entropy(zs, y)))


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_no_gradient_reaches_the_teacher_through_the_standardisation(name):
    method = create_method(method_options(name, logit_standardization=True), ls_pair())
    zs, zt = rand64(4, 10, seed=9).requires_grad_(), rand64(4, 10, seed=10).requires_grad_()
    total, _ = method.loss(make_batch(4, 10), {"logits": zs}, {"logits": zt}, 30)
    total.backward()
    assert zt.grad is None and zs.grad.abs().sum() > 0
