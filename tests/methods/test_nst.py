"""nst (neuron selectivity transfer): squared-polynomial MMD between channel-normalised feature maps."""
from __future__ import annotations

import numpy as np

from tests.helpers import assert_refuses, close, np_block_pool, rand64


def np_nst_level(fs, ft):
    n = fs.shape[0]

    def chan(f):
        v = f.reshape(f.shape[0], f.shape[1], -1)
        return v / np.linalg.norm(v, axis=2, keepdims=True)

    s, t = chan(fs), chan(ft)

    def kmean(a, b):
        return np.mean([np.dot(a[k, i], b[k, j]) ** 2 for k in range(n) for i in range(a.shape[1]) for j in range(b.shape[1])])

    return kmean(t, t) + kmean(s, s) - 2 * kmean(s, t)


def test_nst_matches_explicit_loops_including_pooling():
    from kdbench.methods.nst import nst_level_loss, nst_loss

    f_s, f_t = rand64(3, 4, 4, 4, seed=7, relu=True), rand64(3, 6, 4, 4, seed=8, relu=True)
    close(nst_level_loss(f_s, f_t), np_nst_level(f_s.numpy(), f_t.numpy()))
    # teacher map larger (8x8) -> pooled to the student's 4x4
    big_t = rand64(3, 5, 8, 8, seed=9, relu=True)
    pooled = np.stack([np_block_pool(x, 4) for x in big_t.numpy()])
    expected = np_nst_level(f_s.numpy(), pooled)
    close(nst_level_loss(f_s, big_t), expected)
    close(nst_loss([f_s, f_s], [f_t, big_t]), np_nst_level(f_s.numpy(), f_t.numpy()) + expected)


def test_nst_refuses_a_teacher_without_feature_maps():
    assert_refuses("nst", "mlp_800x2", "resnet8", "(C, H, W)")
