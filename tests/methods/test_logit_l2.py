"""logit_l2 (Ba & Caruana): L2 regression of the student's logits onto the teacher's."""
from __future__ import annotations

import numpy as np
import pytest

from kdbench.methods.logit_l2 import logit_l2_loss
from tests.helpers import assert_no_teacher_grad, rng, t64


def test_logit_l2_matches_loops_in_both_reductions_and_spares_the_teacher():
    zs, zt = rng(2).normal(size=(3, 4)), rng(3).normal(size=(3, 4))
    sq = [[(zs[i, k] - zt[i, k]) ** 2 for k in range(4)] for i in range(3)]
    mean_ref = sum(map(sum, sq)) / 12
    paper_ref = sum(0.5 * sum(row) for row in sq) / 3
    s, t = t64(zs).requires_grad_(), t64(zt).requires_grad_()
    assert logit_l2_loss(s, t, "mean").item() == pytest.approx(mean_ref, rel=1e-12)
    assert logit_l2_loss(s, t, "paper").item() == pytest.approx(paper_ref, rel=1e-12)
    assert_no_teacher_grad(logit_l2_loss(s, t), t)
    np.testing.assert_allclose(s.grad.numpy(), 2 * (zs - zt) / 12, rtol=1e-12)
