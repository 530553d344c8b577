"""at (attention transfer): L2 between normalised attention maps, per stage."""
from __future__ import annotations

import pytest

from kdbench.methods.at import at_layer_loss, at_loss
from tests.helpers import assert_no_teacher_grad, np_attention, np_block_pool, rng, t64


def test_at_matches_loops_when_the_teacher_map_is_larger():
    r = rng(6)
    fs = [r.normal(size=(2, 3, 4, 4)), r.normal(size=(2, 2, 2, 2))]
    ft = [r.normal(size=(2, 5, 8, 8)), r.normal(size=(2, 4, 2, 2))]  # level 0: teacher 8x8 pooled to 4x4
    ref = 0.0
    for a, b in zip(fs, ft):
        if b.shape[-1] > a.shape[-1]:
            b = np_block_pool(b, a.shape[-1])
        d = np_attention(a) - np_attention(b)
        ref += (d ** 2).sum() / d.size
    s = [t64(x).requires_grad_() for x in fs]
    t = [t64(x).requires_grad_() for x in ft]
    got = at_loss(s, t, p=2)
    assert got.item() == pytest.approx(ref, rel=1e-10)
    assert_no_teacher_grad(got, *t)
    assert at_layer_loss(t64(fs[0]), t64(fs[0])).item() == 0.0
