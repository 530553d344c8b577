"""rkd (relational KD): SmoothL1 between normalised pairwise distances and between triplet angles."""
from __future__ import annotations

import itertools

import numpy as np

from tests.helpers import close, rand64


def np_smooth_l1(a, b):
    d = np.abs(a - b)
    return np.where(d < 1, 0.5 * d**2, d - 0.5).mean()


def test_rkd_distance_and_angle_match_explicit_loops():
    from kdbench.methods.rkd import rkd_angle_loss, rkd_distance_loss, rkd_loss

    e_s, e_t = rand64(6, 5, seed=3), rand64(6, 7, seed=4) * 3
    n = 6

    def dist(e):
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)])
        return d / d[~np.eye(n, dtype=bool)].mean()

    def angles(e):
        out = np.zeros((n, n, n))
        for i, j, k in itertools.product(range(n), repeat=3):
            u = e[j] - e[i]
            v = e[k] - e[i]
            u = u / np.linalg.norm(u) if j != i else np.zeros_like(u)
            v = v / np.linalg.norm(v) if k != i else np.zeros_like(v)
            out[i, j, k] = np.dot(u, v)
        return out

    s, t = e_s.numpy(), e_t.numpy()
    exp_d = np_smooth_l1(dist(s), dist(t))
    exp_a = np_smooth_l1(angles(s), angles(t))
    close(rkd_distance_loss(e_s, e_t), exp_d)
    close(rkd_angle_loss(e_s, e_t), exp_a)
    close(rkd_loss(e_s, e_t), 25 * exp_d + 50 * exp_a)
    # the linear branch of SmoothL1 (|diff| >= 1) is reached with strongly non-uniform distances
    far = e_s.clone()
    far[0] += 40
    d = rkd_distance_loss(far, e_t)
    close(d, np_smooth_l1(dist(far.numpy()), dist(t)))
