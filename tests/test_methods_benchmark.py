"""The RepDistiller/mdistiller benchmark feature methods: sp, cc, vid, rkd, pkt, nst, crd (+kd), dkd, kdsvd, ab, ofd,
reviewkd (reference/methods.md §2.4-2.9, §2.12-2.17).

Every loss is checked against an independent float64 NumPy formulation (explicit loops over samples, channels and
positions) on tiny tensors; the heads' extra parameter counts against methods.md §3.4 on the real CIFAR models;
gradients never reach the teacher; incompatible pairs fail at construction with IncompatibleModels; and (slow) each
method trains one epoch end to end on CIFAR-shaped synthetic data with resnet32x4 -> resnet8x4.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdbench.config import CONF_DIR
from kdbench.data.loader import Batch
from kdbench.distill import PairInfo, create_method
from kdbench.errors import IncompatibleModels
from kdbench.models import count_parameters, create_model, probe_taps
from tests.conftest import TINY_SYNTHETIC

CONF = CONF_DIR / "method"
METHODS = ["sp", "cc", "vid", "rkd", "pkt", "nst", "crd", "crd_kd", "dkd", "kdsvd", "ab", "ofd", "reviewkd"]


def method_cfg(name: str, **options):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    for key, value in options.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def make_pair(teacher: str, student: str, num_classes: int = 10, input_shape=(3, 16, 16), n_train: int = 40,
              seed: int = 0) -> PairInfo:
    torch.manual_seed(seed)
    t = create_model(teacher, num_classes=num_classes, input_shape=input_shape)
    s = create_model(student, num_classes=num_classes, input_shape=input_shape)
    labels = torch.arange(n_train) % num_classes
    return PairInfo(s, t, probe_taps(s, input_shape), probe_taps(t, input_shape), student, teacher, num_classes,
                    labels, 240, 0.05)


def make_batch(n: int, num_classes: int, input_shape=(3, 16, 16), indices=None) -> Batch:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *input_shape, generator=g)
    idx = torch.arange(n) if indices is None else torch.as_tensor(indices)
    return Batch(x, idx % num_classes, idx, torch.zeros(n, 2, dtype=torch.long), torch.zeros(n, dtype=torch.bool))


def rand64(*shape, seed=0, relu=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.clamp_min(0) if relu else x


def close(value, expected, tol=1e-6):
    value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    assert abs(value - expected) <= tol * max(1.0, abs(expected)), (value, expected)


def np_normalize_rows(a):
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def np_block_pool(f, size):
    """Average-pool (C, H, W) to (C, size, size) when size divides H (what adaptive pooling does then)."""
    c, h, w = f.shape
    return f.reshape(c, size, h // size, size, w // size).mean(axis=(2, 4))


@pytest.fixture(scope="module")
def benchmark_pair():
    """resnet32x4 -> resnet8x4 at 100 classes and 32x32 input (models built, no training)."""
    return make_pair("resnet32x4", "resnet8x4", num_classes=100, input_shape=(3, 32, 32), n_train=200)


# ----------------------------------------------------------------------------- SP


def test_sp_matches_explicit_loops():
    from kdbench.methods.sp import sp_loss

    f_s, f_t = rand64(5, 3, 2, 2, seed=1), rand64(5, 6, 4, 4, seed=2)
    n = 5

    def gram(f):
        f = f.reshape(n, -1)
        g = np.array([[float(np.dot(f[i], f[j])) for j in range(n)] for i in range(n)])
        return g / np.sqrt((g**2).sum(1, keepdims=True))

    gs, gt = gram(f_s.numpy()), gram(f_t.numpy())
    expected = sum((gt[i, j] - gs[i, j]) ** 2 for i in range(n) for j in range(n)) / n**2
    close(sp_loss(f_s, f_t), expected)


# ----------------------------------------------------------------------------- RKD


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


# ----------------------------------------------------------------------------- PKT


def test_pkt_matches_explicit_loops():
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


# ----------------------------------------------------------------------------- NST


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


# ----------------------------------------------------------------------------- VID


def test_vid_nll_and_regressor():
    from kdbench.methods.vid import VIDRegressor, softplus_variance, vid_nll

    mean, target = rand64(2, 3, 2, 2, seed=10), rand64(2, 3, 2, 2, seed=11)
    var = torch.tensor([0.5, 2.0, 5.0], dtype=torch.float64)
    m, t, v = mean.numpy(), target.numpy(), var.numpy()
    terms = [0.5 * ((m[n, c, i, j] - t[n, c, i, j]) ** 2 / v[c] + math.log(v[c]))
             for n in range(2) for c in range(3) for i in range(2) for j in range(2)]
    close(vid_nll(mean, target, var), sum(terms) / len(terms))

    reg = VIDRegressor(4, 6, 6)
    close(softplus_variance(reg.alpha, reg.eps)[0], 5.0, 1e-6)  # sigma^2 = 5 at init
    convs = [m for m in reg.regressor if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == \
        [(4, 6, (1, 1), None), (6, 6, (1, 1), None), (6, 6, (1, 1), None)]
    assert isinstance(reg.alpha, torch.nn.Parameter)
    assert not isinstance(VIDRegressor(4, 6, 6, learn_var=False).alpha, torch.nn.Parameter)
    # the student map (8x8) is pooled to the teacher's 4x4 before the regressor
    f_s, f_t = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)
    with torch.no_grad():
        mu = reg.regressor(torch.nn.functional.avg_pool2d(f_s, 2))
        expected = vid_nll(mu, f_t, softplus_variance(reg.alpha, reg.eps))
        close(reg(f_s, f_t), float(expected), 1e-5)


# ----------------------------------------------------------------------------- CC


def test_cc_reference_and_paper_match_explicit_loops():
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


def test_cc_variant_option():
    pair = make_pair("resnet14", "resnet8")
    assert create_method(method_cfg("cc"), pair).variant == "reference"
    assert create_method(method_cfg("cc", variant="paper"), pair).variant == "paper"
    with pytest.raises(ValueError):
        create_method(method_cfg("cc", variant="bogus"), pair)


# ----------------------------------------------------------------------------- CRD


def np_nce(p, n_data, eps=1e-7):
    n, m = p.shape[0], p.shape[1] - 1
    pn = 1.0 / n_data
    total = 0.0
    for i in range(n):
        total += math.log(p[i, 0] / (p[i, 0] + m * pn + eps))
        for k in range(1, m + 1):
            total += math.log(m * pn / (p[i, k] + m * pn + eps))
    return -total / n


def test_crd_nce_loss_matches_explicit_loops():
    from kdbench.methods.crd import nce_loss

    p = torch.rand(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1e-3
    close(nce_loss(p, 50), np_nce(p.numpy(), 50))


def test_crd_loss_banks_and_z_against_numpy():
    pair = make_pair("resnet14", "resnet8", n_train=40)
    method = create_method(method_cfg("crd", nce_k=5), pair).double()
    assert method.nce_k == 5
    n, dim = 4, 128
    f_s, f_t = rand64(n, 64, seed=20, relu=True), rand64(n, 64, seed=21, relu=True)
    idx = torch.tensor([3, 17, 22, 38])
    contrast = torch.tensor([[3, 1, 5, 7, 9, 11], [17, 0, 2, 4, 6, 8], [22, 1, 3, 5, 7, 9], [38, 0, 10, 20, 30, 31]])
    bank_s0, bank_t0 = method.bank_s.numpy().copy(), method.bank_t.numpy().copy()

    def embed(lin, f):
        e = f @ lin.weight.detach().numpy().T + lin.bias.detach().numpy()
        return e / np.sqrt((e**2).sum(1, keepdims=True))

    e_s, e_t = embed(method.embed_s.linear, f_s.numpy()), embed(method.embed_t.linear, f_t.numpy())
    c = contrast.numpy()
    out_s = np.array([[math.exp(np.dot(bank_t0[c[i, k]], e_s[i]) / 0.07) for k in range(6)] for i in range(n)])
    out_t = np.array([[math.exp(np.dot(bank_s0[c[i, k]], e_t[i]) / 0.07) for k in range(6)] for i in range(n)])
    z_s, z_t = out_s.mean() * 40, out_t.mean() * 40
    expected = np_nce(out_s / z_s, 40) + np_nce(out_t / z_t, 40)
    loss = method.crd_loss(f_s, f_t, idx, contrast)
    close(loss, expected)
    close(method.z[0], z_s)
    close(method.z[1], z_t)
    # momentum-0.5 update of the batch's own rows, re-normalised; other rows untouched
    for bank0, bank, e in ((bank_s0, method.bank_s.numpy(), e_s), (bank_t0, method.bank_t.numpy(), e_t)):
        for row, i in enumerate(idx.tolist()):
            v = 0.5 * bank0[i] + 0.5 * e[row]
            np.testing.assert_allclose(bank[i], v / np.linalg.norm(v), atol=1e-12)
        others = sorted(set(range(40)) - set(idx.tolist()))
        np.testing.assert_array_equal(bank[others], bank0[others])
    # Z stays fixed on later batches, and survives a state_dict round trip (resume)
    z = method.z.clone()
    method.crd_loss(f_s * 2, f_t, idx, contrast)
    assert torch.equal(method.z, z)
    fresh = create_method(method_cfg("crd", nce_k=5), pair).double()
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.z, z) and torch.equal(fresh.bank_s, method.bank_s)
    assert {"bank_s", "bank_t", "z"} <= set(method.state_dict())


def test_crd_sampler_exact_relax_and_replacement():
    from kdbench.methods.crd import ContrastSampler

    labels = torch.tensor([0] * 6 + [1] * 10 + [2] * 4)  # 20 samples, unbalanced
    idx = torch.arange(20)
    torch.manual_seed(0)
    out = ContrastSampler(labels, k=8, mode="exact")(idx)
    assert out.shape == (20, 9) and torch.equal(out[:, 0], idx)
    for i in range(20):
        neg = out[i, 1:]
        assert (labels[neg] != labels[i]).all()
        assert len(set(neg.tolist())) == 8  # without replacement (pool >= 8 for every class)
    # K above a class's pool (class 1 has 10 others): that row draws with replacement, still other-class only
    out = ContrastSampler(labels, k=12, mode="exact")(idx)
    for i in range(20):
        assert (labels[out[i, 1:]] != labels[i]).all()
        if labels[i] != 1:
            assert len(set(out[i, 1:].tolist())) == 12
    relax = ContrastSampler(labels, k=4, mode="relax")(idx)
    assert (labels[relax[:, 0]] == labels).all()
    assert not torch.equal(relax[:, 0], idx)  # (with 20 samples the positive is another sample for some rows)


def test_crd_k_is_clamped_to_the_dataset_and_kd_variant():
    pair = make_pair("resnet14", "resnet8", n_train=40)
    crd = create_method(method_cfg("crd"), pair)
    assert crd.nce_k == 40 and crd.bank_s.shape == (40, 128)
    crd_kd = create_method(method_cfg("crd_kd"), pair)
    assert crd_kd.with_kd and not crd.with_kd
    assert OmegaConf.load(CONF / "crd_kd.yaml").label == "crd_kd"


# ----------------------------------------------------------------------------- DKD


def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_dkd_matches_non_target_softmax_and_kd_decomposition():
    from kdbench.methods.dkd import dkd_loss, nckd_loss, tckd_loss
    from kdbench.methods.kd import kd_loss

    z_s, z_t = rand64(4, 6, seed=30) * 3, rand64(4, 6, seed=31) * 3
    y = torch.tensor([0, 3, 5, 3])
    temp = 4.0
    tck = nck = 0.0
    for i in range(4):
        ps, pt = np_softmax(z_s[i].numpy() / temp), np_softmax(z_t[i].numpy() / temp)
        t = int(y[i])
        bs, bt = np.array([ps[t], 1 - ps[t]]), np.array([pt[t], 1 - pt[t]])
        tck += float((bt * np.log(bt / bs)).sum())
        keep = [c for c in range(6) if c != t]  # softmax over the non-target logits only
        qs, qt = np_softmax(z_s[i].numpy()[keep] / temp), np_softmax(z_t[i].numpy()[keep] / temp)
        nck += float((qt * np.log(qt / qs)).sum())
    close(tckd_loss(z_s, z_t, y, temp), temp**2 * tck / 4)
    close(nckd_loss(z_s, z_t, y, temp), temp**2 * nck / 4)
    close(dkd_loss(z_s, z_t, y, 1.0, 8.0, temp), temp**2 * (tck + 8 * nck) / 4)
    # the paper's identity, per sample: KD = TCKD + (1 - p_t[target]) * NCKD
    for i in range(4):
        p_t_target = np_softmax(z_t[i].numpy() / temp)[int(y[i])]
        one = slice(i, i + 1)
        close(kd_loss(z_s[one], z_t[one], temp),
              float(tckd_loss(z_s[one], z_t[one], y[one], temp) + (1 - p_t_target) * nckd_loss(z_s[one], z_t[one], y[one], temp)))


def test_dkd_warmup_and_beta():
    pair = make_pair("resnet14", "resnet8")
    m = create_method(method_cfg("dkd"), pair)
    assert m.term_weights(1) == pytest.approx({"ce": 1.0, "tckd": 0.05, "nckd": 0.4})
    assert m.term_weights(10) == pytest.approx({"ce": 1.0, "tckd": 0.5, "nckd": 4.0})
    assert m.term_weights(20) == m.term_weights(240) == {"ce": 1.0, "tckd": 1.0, "nckd": 8.0}
    m2 = create_method(method_cfg("dkd", **{"weights.nckd": 2.0}), pair)
    assert m2.term_weights(40)["nckd"] == 2.0


# ----------------------------------------------------------------------------- KDSVD


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


def test_kdsvd_reshape_option():
    pair = make_pair("resnet14", "resnet8")
    assert create_method(method_cfg("kdsvd"), pair).reshape == "rd"
    assert create_method(method_cfg("kdsvd", reshape="md"), pair).reshape == "md"
    with pytest.raises(ValueError):
        create_method(method_cfg("kdsvd", reshape="xy"), pair)


# ----------------------------------------------------------------------------- AB


def test_ab_loss_matches_explicit_loops():
    from kdbench.methods.ab import ab_loss

    g_s = [rand64(2, 2, 3, 3, seed=50) * 2, rand64(2, 3, 2, 2, seed=51) * 2]
    g_t = [rand64(2, 2, 3, 3, seed=52), rand64(2, 3, 2, 2, seed=53)]
    m = 1.0
    total = 0.0
    for level, (s, t) in enumerate(zip(g_s, g_t)):
        acc = 0.0
        for a, b in zip(s.numpy().ravel(), t.numpy().ravel()):
            if a > -m and b <= 0:
                acc += (a + m) ** 2
            if a <= m and b > 0:
                acc += (a - m) ** 2
        total += 2.0 ** (level - 2 + 1) * acc / 2 * 3 / 1000
    close(ab_loss(g_s, g_t, m), total)


def test_ab_stage_and_main_training():
    pair = make_pair("resnet14", "resnet8")
    m = create_method(method_cfg("ab", stage_epochs=3), pair)
    assert all(isinstance(c, torch.nn.Identity) for c in m.connectors)  # same widths: identity connectors
    [stage] = m.stages(pair.student, pair.teacher)
    assert (stage.epochs, stage.lr) == (3, 0.05)
    assert stage.student_taps == stage.teacher_taps == ("stage1_pre", "stage2_pre", "stage3_pre")
    ids = {id(p) for p in stage.parameters}
    assert all(id(p) not in ids for p in pair.student.fc.parameters())
    assert len(ids) == sum(1 for _ in pair.student.parameters()) - 2
    assert list(m.trainable_parameters()) == [] and m.student_taps == ()
    batch = make_batch(4, 10)
    s_out = pair.student.forward_taps(batch.inputs)
    total, terms = m.loss(batch, s_out, None, 1)
    assert set(terms) == {"ce"}
    # mismatched widths get ConvReg connectors (conv + BN, no ReLU); they train in the stage only
    wide = make_pair("resnet8x4", "resnet8")
    m = create_method(method_cfg("ab"), wide)
    assert all(not isinstance(c, torch.nn.Identity) for c in m.connectors)
    [stage] = m.stages(wide.student, wide.teacher)
    conn_ids = {id(p) for p in m.connectors.parameters()}
    assert conn_ids <= {id(p) for p in stage.parameters}
    assert count_parameters(m) == sum(cs * ct + ct + 2 * ct for cs, ct in ((16, 64), (32, 128), (64, 256)))
    assert m.stages(wide.student, wide.teacher)[0].epochs == 30
    assert create_method(method_cfg("ab", stage_epochs=0), wide).stages(wide.student, wide.teacher) == []
    # a model without stageN_pre taps contributes stageN (RD ignores preact for MobileNetV2) unless told not to
    lenet = make_pair("lenet5", "lenet5_half", input_shape=(1, 32, 32))
    assert create_method(method_cfg("ab"), lenet).pairs == [("stage1", "stage1"), ("stage2", "stage2")]
    with pytest.raises(IncompatibleModels, match="stage1_pre"):
        create_method(method_cfg("ab", preact_fallback=False), lenet)


# ----------------------------------------------------------------------------- OFD


def test_ofd_margin_matches_normal_distribution():
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


def test_ofd_connectors_margins_and_teacher_mode():
    pair = make_pair("resnet14", "resnet8")
    bns = pair.teacher.bn_before_relu()
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    m = create_method(method_cfg("ofd"), pair)
    assert m.teacher_train_mode is True
    assert create_method(method_cfg("ofd", teacher_train_mode=False), pair).teacher_train_mode is False
    from kdbench.methods.ofd import ofd_margin

    for i, bn in enumerate(bns):
        assert torch.equal(m.margins[i], ofd_margin(bn.weight, bn.bias))
    assert {"margin1", "margin2", "margin3"} <= set(m.state_dict())
    assert m.student_taps == ("stage1_pre", "stage2_pre", "stage3_pre")


# ----------------------------------------------------------------------------- ReviewKD


def test_hcl_loss_matches_explicit_pooling():
    from kdbench.methods.reviewkd import hcl_loss

    f_s = [rand64(2, 3, 8, 8, seed=70), rand64(2, 2, 2, 2, seed=71), rand64(2, 4, 1, 1, seed=72)]
    f_t = [rand64(2, 3, 8, 8, seed=73), rand64(2, 2, 2, 2, seed=74), rand64(2, 4, 1, 1, seed=75)]
    total = 0.0
    for fs, ft in zip(f_s, f_t):
        fs, ft = fs.numpy(), ft.numpy()
        h = fs.shape[2]
        loss, weight, wsum = ((fs - ft) ** 2).mean(), 1.0, 1.0
        for l in (4, 2, 1):
            if l < h:
                weight /= 2
                ps = np.stack([np_block_pool(x, l) for x in fs])
                pt = np.stack([np_block_pool(x, l) for x in ft])
                loss += weight * ((ps - pt) ** 2).mean()
                wsum += weight
        total += loss / wsum
    close(hcl_loss(f_s, f_t), total)


def test_abf_fusion_matches_manual_computation():
    from kdbench.methods.reviewkd import ABF

    torch.manual_seed(0)
    abf = ABF(3, 4, 5, fuse=True).double().eval()
    x, y = rand64(2, 3, 4, 4, seed=80), rand64(2, 4, 2, 2, seed=81)
    out, res = abf(x, y, (8, 8))
    bn_scale = 1 / math.sqrt(1 + 1e-5)  # eval-mode BN at init: weight 1, bias 0, running mean 0, var 1
    h = torch.nn.functional.conv2d(x, abf.conv1[0].weight) * bn_scale
    y_up = y.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest 2x upsampling
    att = torch.sigmoid(torch.nn.functional.conv2d(torch.cat([h, y_up], 1), abf.att_conv[0].weight, abf.att_conv[0].bias))
    fused = h * att[:, :1] + y_up * att[:, 1:]
    fused = fused.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # to the 8x8 teacher size
    expected = torch.nn.functional.conv2d(fused, abf.conv2[0].weight, padding=1) * bn_scale
    torch.testing.assert_close(res, fused)
    torch.testing.assert_close(out, expected)


def test_reviewkd_config_derivation_and_warmup(benchmark_pair):
    m = create_method(method_cfg("reviewkd"), benchmark_pair)
    # mdistiller's default config, listed shallow -> deep: IN/OUT [64, 128, 256, 256], shapes [32, 16, 8, 1]
    deep_first = list(m.abfs)
    assert [a.conv1[0].in_channels for a in deep_first][::-1] == [64, 128, 256, 256]
    assert [a.conv2[0].out_channels for a in deep_first][::-1] == [64, 128, 256, 256]
    assert [a.conv1[0].out_channels for a in deep_first] == [256] * 4
    assert m.out_sizes == [(32, 32), (16, 16), (8, 8), (1, 1)]
    assert [a.att_conv is None for a in deep_first] == [True, False, False, False]
    assert m.student_taps == ("stage1", "stage2", "stage3", "embedding")
    assert m.teacher_taps == ("stage1_pre", "stage2_pre", "stage3_pre", "embedding")
    assert m.term_weights(1) == pytest.approx({"ce": 1.0, "reviewkd": 0.25})
    assert m.term_weights(20) == m.term_weights(100) == {"ce": 1.0, "reviewkd": 5.0}


# ----------------------------------------------------------------------------- every method on real models


EXTRA_PARAMS = {  # reference/methods.md §3.4, resnet32x4 -> resnet8x4, 100 classes
    "sp": 0, "rkd": 0, "pkt": 0, "nst": 0, "dkd": 0, "kdsvd": 0, "ab": 0,
    "cc": 65_792, "crd": 65_792, "crd_kd": 65_792, "vid": 258_496, "ofd": 86_912, "reviewkd": 1_808_774,
}


@pytest.mark.parametrize("name", METHODS)
def test_extra_parameters_match_reference(benchmark_pair, name):
    assert count_parameters(create_method(method_cfg(name), benchmark_pair)) == EXTRA_PARAMS[name]


def test_vid_fixed_variance_parameter_count(benchmark_pair):
    assert count_parameters(create_method(method_cfg("vid", fixed_variance=True), benchmark_pair)) == 258_048


def test_extra_parameters_resnet56_to_resnet20():
    pair = make_pair("resnet56", "resnet20", num_classes=100, input_shape=(3, 32, 32), n_train=200)
    counts = {name: count_parameters(create_method(method_cfg(name), pair)) for name in ("cc", "crd", "vid", "ofd", "ab")}
    vid_md = count_parameters(create_method(method_cfg("vid", fixed_variance=True), pair))
    assert counts == {"cc": 16_640, "crd": 16_640, "vid": 16_240, "ofd": 5_600, "ab": 0} and vid_md == 16_128


OTHER_PAIRS = {  # reference/methods.md §3.4 (RD modules; "vid_md" = mdistiller's fixed variance, MD OFD)
    ("wrn_40_2", "wrn_16_2"): {"cc": 33_024, "crd": 33_024, "vid": 64_736, "vid_md": 64_512, "ab": 0, "ofd": 21_952},
    ("wrn_40_2", "wrn_40_1"): {"cc": 24_832, "vid": 53_984, "ab": 11_424},
    ("vgg13", "vgg8"): {"cc": 131_328, "vid": 1_820_032, "vid_md": 1_818_624, "ab": 0, "ofd": 609_024},
    ("vgg13", "MobileNetV2"): {"cc": 229_632, "vid": 1_325_952, "ab": 1_345_152},
    ("resnet32x4", "ShuffleV2"): {"cc": 164_096, "vid": 328_384, "ab": 2_495_808},
}


@pytest.mark.parametrize("teacher,student", list(OTHER_PAIRS))
def test_extra_parameters_other_benchmark_pairs(teacher, student):
    from kdbench.models import list_models

    missing = {teacher, student} - set(list_models())
    if missing:
        pytest.skip(f"model(s) {sorted(missing)} not registered")
    pair = make_pair(teacher, student, num_classes=100, input_shape=(3, 32, 32), n_train=200)
    got = {}
    for key in OTHER_PAIRS[(teacher, student)]:
        cfg = method_cfg("vid", fixed_variance=True) if key == "vid_md" else method_cfg(key)
        got[key] = count_parameters(create_method(cfg, pair))
    assert got == OTHER_PAIRS[(teacher, student)]


@pytest.fixture(scope="module")
def small_pair():
    return make_pair("resnet14", "resnet8", num_classes=10, input_shape=(3, 16, 16), n_train=40)


@pytest.mark.parametrize("name", METHODS)
def test_no_gradient_reaches_the_teacher(small_pair, name):
    pair = small_pair
    method = create_method(method_cfg(name), pair)
    stages = method.stages(pair.student, pair.teacher)
    batch = make_batch(6, 10, indices=[0, 7, 13, 21, 30, 39])
    pair.teacher.train(method.teacher_train_mode)
    pair.teacher.requires_grad_(True)
    pair.teacher.zero_grad(set_to_none=True)
    pair.student.zero_grad(set_to_none=True)
    if stages:  # AB: the distillation happens in the stage
        s_taps, t_taps = stages[0].student_taps, stages[0].teacher_taps
        loss_fn = lambda s, t: stages[0].loss(batch, s, t)  # noqa: E731
    else:
        s_taps, t_taps = method.student_taps, method.teacher_taps
        loss_fn = lambda s, t: sum(v for k, v in method.terms(batch, s, t).items() if k != "ce")  # noqa: E731
    t_out = pair.teacher.forward_taps(batch.inputs, t_taps)  # with grad enabled, to catch any leak
    s_out = pair.student.forward_taps(batch.inputs, s_taps)
    loss = loss_fn(s_out, t_out)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in pair.teacher.parameters()), f"{name} sent gradient into the teacher"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pair.student.parameters())
    total, terms = method.loss(batch, pair.student.forward_taps(batch.inputs, method.student_taps),
                               pair.teacher.forward_taps(batch.inputs, method.teacher_taps), 20)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
    pair.teacher.requires_grad_(False)


# ----------------------------------------------------------------------------- incompatible pairs


@pytest.mark.parametrize("name,teacher,student,needle", [
    ("vid", "resnet14", "mlp_800x2", "(C, H, W)"),
    ("nst", "mlp_800x2", "resnet8", "(C, H, W)"),
    ("kdsvd", "resnet14", "mlp_800x2", "(C, H, W)"),
    ("kdsvd", "resnet8x4", "resnet8", "channels"),
    ("ab", "mlp_1200x2", "mlp_800x2", "(C, H, W)"),
    ("ab", "vgg8", "resnet8", "same number of stages"),
    ("ofd", "lenet5", "resnet8", "stage1_pre"),
    ("reviewkd", "lenet5", "lenet5_half", "stage1_pre"),
    ("reviewkd", "vgg8", "resnet8", "same number of stages"),
])
def test_incompatible_pairs_fail_at_construction(name, teacher, student, needle):
    pair = make_pair(teacher, student, input_shape=(3, 32, 32))
    with pytest.raises(IncompatibleModels) as err:
        create_method(method_cfg(name), pair)
    message = str(err.value)
    assert f"'{name}'" in message and teacher in message and student in message and needle in message


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def random_teacher_checkpoint(tmp_path_factory):
    """A resnet32x4 teacher for the 10-class synthetic data (untrained weights: the smoke runs test plumbing)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet32x4.pt"
    torch.save({"model": create_model("resnet32x4", num_classes=10, input_shape=(3, 32, 32)).state_dict()}, path)
    return path


SMOKE_TERMS = {
    "sp": {"ce", "sp"}, "cc": {"ce", "cc"}, "vid": {"ce", "vid"}, "rkd": {"ce", "rkd_distance", "rkd_angle"},
    "pkt": {"ce", "pkt"}, "nst": {"ce", "nst"}, "crd": {"ce", "crd"}, "crd_kd": {"ce", "kd", "crd"},
    "dkd": {"ce", "tckd", "nckd"}, "kdsvd": {"ce", "kdsvd"}, "ab": {"ce"}, "ofd": {"ce", "ofd"},
    "reviewkd": {"ce", "reviewkd"},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_smoke_resnet32x4_to_resnet8x4(run_job, random_teacher_checkpoint, tmp_path, name):
    extra = ["method.stage_epochs=1"] if name == "ab" else []
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet32x4", "student=resnet8x4", f"method={name}",
                     f"teacher.checkpoint={random_teacher_checkpoint}", *extra)
    assert record["status"] == "completed"
    assert record["method"] == name
    assert len(record["history"]) == 1 and 0 <= record["last_top1"] <= 100
    assert set(record["history"][0]["train"]) == {"loss"} | SMOKE_TERMS[name]
    assert record["extra_params"] == EXTRA_PARAMS[name]
    if name == "ab":  # the pre-training stage ran before the main epoch
        assert torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)["stages_done"] == ["ab_init"]


@pytest.mark.slow
def test_incompatible_pair_fails_before_training(run_job, random_teacher_checkpoint):
    with pytest.raises(IncompatibleModels):
        run_job(*TINY_SYNTHETIC, "teacher=resnet32x4", "student=mlp_32", "method=vid",
                f"teacher.checkpoint={random_teacher_checkpoint}")
