"""pkt (probabilistic knowledge transfer): KL between cosine-kernel conditional probabilities of the embeddings."""
from __future__ import annotations

import math

import numpy as np
import torch

from tests.helpers import close, rand64


def test_pkt_matches_explicit_loops_and_survives_a_zero_embedding():
    from kdbench.methods.pkt import pkt_loss

    e_s, e_t = rand64(5, 4, seed=5), rand64(5, 9, seed=6, relu=True)
    n, eps = 5, 1e-7

    def probs(e):
        e = [v / (np.sqrt((v**2).sum()) + eps) for v in e]
        s = np.array([[(np.dot(e[i], e[j]) + 1) / 2 for j in range(n)] for i in range(n)])
        return np.array([[s[i, j] / s[i].sum() for j in range(n)] for i in range(n)])

    ps, pt = probs(e_s.numpy()), probs(e_t.numpy())
    expected = sum(pt[i, j] * math.log((pt[i, j] + eps) / (ps[i, j] + eps)) for i in range(n) for j in range(n)) / n**2
    close(pkt_loss(e_s, e_t), expected)
    # a zero embedding does not produce NaN
    zero = e_s.clone()
    zero[0] = 0
    assert torch.isfinite(pkt_loss(zero, e_t))
