"""ofd (overhaul of feature distillation): partial L2 between the student's connected pre-activations and the
teacher's, clipped at margins derived from the teacher's BatchNorm statistics."""
from __future__ import annotations

import itertools
from statistics import NormalDist

import numpy as np
import torch

from kdbench.distill import create_method
from tests.conftest import make_pair
from tests.helpers import assert_refuses, close, method_options, np_block_pool, rand64


def test_ofd_margin_is_the_expected_negative_response_of_a_normal_distribution():
    from kdbench.methods.ofd import ofd_margin

    gamma = torch.tensor([1.0, -0.5, 2.0, 1.0, 0.3])
    beta = torch.tensor([0.0, 0.2, -1.0, 4.0, -0.1])
    nd = NormalDist()
    expected = []
    for g, b in zip(gamma.tolist(), beta.tolist()):
        s, m = abs(g), b
        if nd.cdf(-m / s) > 0.001:
            expected.append(m - s * nd.pdf(m / s) / nd.cdf(-m / s))
        else:
            expected.append(-3 * s)
    assert expected[3] == -3.0  # the Phi(-m/s) <= 0.001 branch is exercised
    np.testing.assert_allclose(ofd_margin(gamma, beta).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_ofd_loss_matches_explicit_loops():
    from kdbench.methods.ofd import ofd_loss

    g_s = [rand64(2, 3, 2, 2, seed=60), rand64(2, 2, 2, 2, seed=61)]
    g_t = [rand64(2, 3, 4, 4, seed=62), rand64(2, 2, 2, 2, seed=63)]  # level 0 teacher pooled 4x4 -> 2x2
    margins = [torch.tensor([-0.5, -0.1, -1.0], dtype=torch.float64), torch.tensor([-0.3, -0.8], dtype=torch.float64)]
    total = 0.0
    for level, (s, t, mg) in enumerate(zip(g_s, g_t, margins)):
        s, t = s.numpy(), np.stack([np_block_pool(x, 2) for x in t.numpy()])
        acc = 0.0
        for n, c, i, j in itertools.product(*map(range, s.shape)):
            a, b, m = s[n, c, i, j], t[n, c, i, j], float(mg[c])
            if a > m and b <= m:
                acc += (a - m) ** 2
            if a > b and m < b <= 0:
                acc += (a - b) ** 2
            if b > 0:
                acc += (a - b) ** 2
        total += acc / s.shape[0] / 2 ** (2 - level - 1)
    close(ofd_loss(g_s, g_t, margins), total)


def test_ofd_takes_margins_from_the_teachers_bn_and_runs_the_teacher_in_train_mode():
    pair = make_pair("resnet14", "resnet8")
    bns = pair.teacher.bn_before_relu()
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    m = create_method(method_options("ofd"), pair)
    assert m.teacher_train_mode is True
    assert create_method(method_options("ofd", teacher_train_mode=False), pair).teacher_train_mode is False
    from kdbench.methods.ofd import ofd_margin

    for i, bn in enumerate(bns):
        assert torch.equal(m.margins[i], ofd_margin(bn.weight, bn.bias))
    assert {"margin1", "margin2", "margin3"} <= set(m.state_dict())
    assert m.student_taps == ("stage1_pre", "stage2_pre", "stage3_pre")


def test_ofd_refuses_a_teacher_without_pre_activation_taps():
    assert_refuses("ofd", "lenet5", "resnet8", "stage1_pre")


def test_ofd_levels_keeps_only_the_deepest_stages_and_their_margins():
    """levels=k (mdistiller's ImageNet ResNet-50 -> MobileNet-V1: 3 of 4) distils the deepest k aligned stages, with
    the margins of those stages' BN-before-ReLU and the 2^(k-i-1) level weights of a k-level loss."""
    from kdbench.methods.ofd import ofd_loss, ofd_margin
    from tests.helpers import forward

    pair = make_pair("resnet14", "resnet8", input_shape=(3, 32, 32))
    m = create_method(method_options("ofd", levels=2), pair)
    assert m.student_taps == m.teacher_taps == ("stage2_pre", "stage3_pre")
    bns = pair.teacher.bn_before_relu()[1:]
    for margin, bn in zip(m.margins, bns, strict=True):
        assert torch.equal(margin, ofd_margin(bn.weight, bn.bias))
    assert len(m.connectors) == 2 and "margin3" not in m.state_dict()
    s_out, t_out = forward(pair, m)
    g_s = [conn(s_out[tap]) for conn, tap in zip(m.connectors, m.student_taps)]
    expected = ofd_loss(g_s, [t_out[tap] for tap in m.teacher_taps], [ofd_margin(b.weight, b.bias) for b in bns])
    close(m.terms(None, s_out, t_out)["ofd"], expected.item())
    assert create_method(method_options("ofd", levels=None), pair).student_taps == ("stage1_pre", "stage2_pre", "stage3_pre")


def test_ofd_refuses_more_levels_than_the_pair_has():
    import pytest
    from kdbench.errors import IncompatibleModels

    pair = make_pair("resnet14", "resnet8")
    with pytest.raises(IncompatibleModels, match="levels=4"):
        create_method(method_options("ofd", levels=4), pair)
