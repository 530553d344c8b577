"""kdsvd (KD via singular value decomposition): Gaussian-kernel correlations between the leading singular vectors of
consecutive stages, student vectors aligned to the teacher's."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.distill import create_method
from tests.conftest import make_pair
from tests.helpers import assert_refuses, close, method_options, rand64


def np_kdsvd(g_s, g_t, k, reshape, torch_teacher_v):
    """Loop formulation; the teacher's singular-vector signs follow torch's (the SVD's gauge), the rest is NumPy."""
    n = g_s[0].shape[0]
    total = 0.0
    prev = None
    for level, (fs, ft) in enumerate(zip(g_s, g_t)):
        vs_all, vt_all = [], []
        for i in range(n):
            mats = []
            for f in (fs[i], ft[i]):
                c, h, w = f.shape
                mats.append(f.reshape(c, h * w).T if reshape == "rd" else f.reshape(c * h, w))
            _, ss, vhs = np.linalg.svd(mats[0], full_matrices=False)
            _, st, vht = np.linalg.svd(mats[1], full_matrices=False)
            vs = vhs.T[:, : k + 3]
            vt = vht.T[:, :k]
            gauge = np.sign(np.sum(vt * torch_teacher_v[level][i][:, :k], axis=0))
            vt = vt * gauge
            vs = vs / np.linalg.norm(vs, axis=0)
            vt = vt / np.linalg.norm(vt, axis=0)
            s_norm = st[:k] / np.linalg.norm(st[:k])
            aligned = np.zeros_like(vt)
            for j in range(vt.shape[1]):
                cos = [float(np.dot(vs[:, a], vt[:, j])) for a in range(vs.shape[1])]
                best = int(np.argmax(np.abs(cos)))
                aligned[:, j] = np.sign(cos[best]) * vs[:, best]
            vs_all.append(aligned * s_norm)
            vt_all.append(vt * s_norm)
        if prev is not None:
            for i in range(n):
                rs = np.array([[[math.exp(-(vs_all[i][a, j] - prev[0][i][b, j]) ** 2 / 8) for j in range(k)]
                                for b in range(prev[0][i].shape[0])] for a in range(vs_all[i].shape[0])])
                rt = np.array([[[math.exp(-(vt_all[i][a, j] - prev[1][i][b, j]) ** 2 / 8) for j in range(k)]
                                for b in range(prev[1][i].shape[0])] for a in range(vt_all[i].shape[0])])
                total += ((rs - rt) ** 2).sum()
        prev = (vs_all, vt_all)
    return total / n


@pytest.mark.parametrize("reshape,k", [("rd", 1), ("rd", 2), ("md", 1)])
def test_kdsvd_matches_numpy_svd_loops(reshape, k):
    from kdbench.methods.kdsvd import kdsvd_loss

    g_s = [rand64(3, 5, 4, 4, seed=40), rand64(3, 6, 2, 2, seed=41) + 0.5, rand64(3, 7, 2, 2, seed=42)]
    g_t = [rand64(3, 5, 4, 4, seed=43), rand64(3, 6, 2, 2, seed=44), rand64(3, 7, 2, 2, seed=45)]
    teacher_v = []
    for f in g_t:
        b, c, h, w = f.shape
        x = f.reshape(b, c, h * w).transpose(1, 2) if reshape == "rd" else f.reshape(b, c * h, w)
        teacher_v.append(torch.linalg.svd(x, full_matrices=False)[2].transpose(1, 2).numpy())
    expected = np_kdsvd([f.numpy() for f in g_s], [f.numpy() for f in g_t], k, reshape, teacher_v)
    close(kdsvd_loss(g_s, g_t, k, reshape), expected)


def test_kdsvd_reshape_option_selects_rd_or_md_and_rejects_others():
    pair = make_pair("resnet14", "resnet8")
    assert create_method(method_options("kdsvd"), pair).reshape == "rd"
    assert create_method(method_options("kdsvd", reshape="md"), pair).reshape == "md"
    with pytest.raises(ValueError):
        create_method(method_options("kdsvd", reshape="xy"), pair)


def test_kdsvd_refuses_a_student_without_feature_maps():
    assert_refuses("kdsvd", "resnet14", "mlp_800x2", "(C, H, W)")


def test_kdsvd_refuses_stages_of_different_widths():
    assert_refuses("kdsvd", "resnet8x4", "resnet8", "channels")
