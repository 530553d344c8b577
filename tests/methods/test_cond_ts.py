"""cond_ts (conditional teacher-student learning): soft targets where the teacher is right, labels where it is wrong."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.methods.cond_ts import conditional_ts_loss
from tests.helpers import assert_no_teacher_grad, np_softmax, rng, t64


def np_cond_ts(zs, zt, y, T=1.0, kl=False):
    losses = []
    for i in range(len(y)):
        if int(np.argmax(zt[i])) == y[i]:
            pt, ps = np_softmax(zt[i] / T), np_softmax(zs[i] / T)
            val = -sum(pt[k] * math.log(ps[k]) for k in range(len(pt)))
            if kl:
                val += sum(pt[k] * math.log(pt[k]) for k in range(len(pt)))
            losses.append(val * T * T)
        else:
            losses.append(-math.log(np_softmax(zs[i])[y[i]]))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("T, kl", [(1.0, False), (2.0, False), (1.0, True)])
def test_cond_ts_matches_loops_and_spares_the_teacher(T, kl):
    zs = rng(4).normal(size=(6, 5))
    zt = rng(5).normal(size=(6, 5)) * 3
    y = np.argmax(zt, 1).copy()
    y[[1, 4]] = (y[[1, 4]] + 1) % 5  # the teacher is wrong on samples 1 and 4
    s, t = t64(zs).requires_grad_(), t64(zt).requires_grad_()
    got = conditional_ts_loss(s, t, torch.tensor(y), T, "kl" if kl else "ce")
    assert got.item() == pytest.approx(np_cond_ts(zs, zt, y, T, kl), rel=1e-10)
    assert_no_teacher_grad(got, t)


def test_cond_ts_switches_between_teacher_and_label_per_sample():
    """Where the teacher is wrong its logits do not matter; where it is right the label term is absent."""
    zs = torch.randn(4, 5, dtype=torch.float64)
    zt = torch.eye(5, dtype=torch.float64)[:4] * 5  # teacher predicts 0, 1, 2, 3
    y = torch.tensor([0, 1, 4, 4])  # right on 0 and 1, wrong on 2 and 3
    base = conditional_ts_loss(zs, zt, y)
    zt2 = zt.clone()
    zt2[2:, 3] += 1.0  # change the wrong samples' logits (their top-1 stays wrong)
    assert conditional_ts_loss(zs, zt2, y).item() == pytest.approx(base.item(), rel=1e-12)
    all_right = conditional_ts_loss(zs, zt, torch.tensor([0, 1, 2, 3]))
    soft = -(torch.softmax(zt, 1) * torch.log_softmax(zs, 1)).sum(1).mean()
    assert all_right.item() == pytest.approx(soft.item(), rel=1e-12)
    all_wrong = conditional_ts_loss(zs, zt, torch.tensor([4, 4, 4, 0]))
    assert all_wrong.item() == pytest.approx(torch.nn.functional.cross_entropy(zs, torch.tensor([4, 4, 4, 0])).item())
