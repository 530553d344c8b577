"""cc (correlation congruence): RepDistiller's embedding-difference correlation, or the paper's Gaussian-kernel
correlation matrices (variant=paper)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kdbench.distill import create_method
from tests.conftest import make_pair
from tests.helpers import close, method_options, rand64


def test_cc_reference_and_paper_losses_match_explicit_loops():
    from kdbench.methods.cc import cc_paper_loss, cc_reference_loss

    e_s, e_t = rand64(5, 4, seed=12), rand64(5, 4, seed=13)
    s, t = e_s.numpy(), e_t.numpy()
    delta = np.abs(s - t)
    expected = sum(sum(delta[i, d] * delta[i + 1, d] for d in range(4)) for i in range(4)) / 4
    close(cc_reference_loss(e_s, e_t), expected)

    gamma, order = 0.4, 2

    def corr(e):
        return np.array([[math.exp(-2 * gamma) * sum((2 * gamma) ** p / math.factorial(p) * np.dot(e[i], e[j]) ** p
                                                     for p in range(order + 1)) for j in range(5)] for i in range(5)])

    expected = math.sqrt(((corr(s) - corr(t)) ** 2).sum()) / 25
    close(cc_paper_loss(e_s, e_t, gamma, order), expected)


def test_cc_variant_option_selects_reference_or_paper_and_rejects_others():
    pair = make_pair("resnet14", "resnet8")
    assert create_method(method_options("cc"), pair).variant == "reference"
    assert create_method(method_options("cc", variant="paper"), pair).variant == "paper"
    with pytest.raises(ValueError):
        create_method(method_options("cc", variant="bogus"), pair)
