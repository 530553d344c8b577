"""darkrank (DarkRank): transfer of the teacher's similarity ranking, hard (ListMLE) or soft (KL over top-k orders)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from kdbench.methods.darkrank import darkrank_hard_loss, darkrank_scores, darkrank_soft_loss, plackett_luce_log_prob
from tests.helpers import assert_no_teacher_grad, rng, t64


def np_scores(x, alpha, beta, normalize):
    if normalize:
        x = x / np.sqrt((x ** 2).sum(1, keepdims=True))
    n = len(x)
    return np.array([[-alpha * math.sqrt(((x[i] - x[j]) ** 2).sum()) ** beta for j in range(n)] for i in range(n)])


def np_pl_prob(s):
    prob = 1.0
    for i in range(len(s)):
        prob *= math.exp(s[i]) / sum(math.exp(v) for v in s[i:])
    return prob


def np_teacher_order(ts, q):
    return sorted((j for j in range(len(ts)) if j != q), key=lambda j: -ts[q, j])


@pytest.mark.parametrize("normalize", [True, False])
def test_darkrank_hard_loss_matches_listmle_loops(normalize):
    xs, xt = rng(9).normal(size=(6, 3)) * 0.4, rng(10).normal(size=(6, 5)) * 0.4
    ss, ts = np_scores(xs, 3, 3, normalize), np_scores(xt, 3, 3, normalize)
    np.testing.assert_allclose(darkrank_scores(t64(xs), 3, 3, normalize).numpy()[~np.eye(6, dtype=bool)],
                               ss[~np.eye(6, dtype=bool)], rtol=1e-9)
    ref = np.mean([-math.log(np_pl_prob([ss[q, j] for j in np_teacher_order(ts, q)])) for q in range(6)])
    ref_top3 = np.mean([-math.log(np_pl_prob([ss[q, j] for j in np_teacher_order(ts, q)[:3]])) for q in range(6)])
    s, t = t64(xs).requires_grad_(), t64(xt).requires_grad_()
    assert darkrank_hard_loss(s, t, 3, 3, normalize, top_k=3).item() == pytest.approx(ref_top3, rel=1e-9)
    got = darkrank_hard_loss(s, t, 3, 3, normalize)
    assert got.item() == pytest.approx(ref, rel=1e-9)
    assert_no_teacher_grad(got, t)
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("k", [3, 4])
def test_darkrank_soft_loss_matches_kl_over_all_top_k_orderings(k):
    xs, xt = rng(11).normal(size=(7, 4)), rng(12).normal(size=(7, 6))
    ss, ts = np_scores(xs, 3, 3, True), np_scores(xt, 3, 3, True)
    ref = 0.0
    for q in range(7):
        top = np_teacher_order(ts, q)[:k]
        perms = list(itertools.permutations(top))
        assert len(perms) == math.factorial(k)
        pt = [np_pl_prob([ts[q, j] for j in p]) for p in perms]
        ps = [np_pl_prob([ss[q, j] for j in p]) for p in perms]
        assert sum(pt) == pytest.approx(1.0) and sum(ps) == pytest.approx(1.0)
        ref += sum(a * math.log(a / b) for a, b in zip(pt, ps)) / 7
    s, t = t64(xs).requires_grad_(), t64(xt).requires_grad_()
    got = darkrank_soft_loss(s, t, 3, 3, True, top_k=k)
    assert got.item() == pytest.approx(ref, rel=1e-9)
    assert_no_teacher_grad(got, t)
    same = t64(xt)
    assert darkrank_soft_loss(same, same, top_k=k).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_darkrank_losses_stay_finite_on_tiny_batches(n):
    s = torch.randn(n, 5, requires_grad=True)
    for loss in (darkrank_hard_loss(s, torch.randn(n, 5)), darkrank_soft_loss(s, torch.randn(n, 5))):
        assert torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(s.grad).all()


def test_plackett_luce_probabilities_of_all_orderings_sum_to_one():
    s = torch.randn(5, dtype=torch.float64)
    total = sum(plackett_luce_log_prob(s[list(p)]).exp() for p in itertools.permutations(range(5)))
    assert total.item() == pytest.approx(1.0, rel=1e-12)
