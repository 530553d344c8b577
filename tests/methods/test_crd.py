"""crd (contrastive representation distillation) and crd_kd (crd plus Hinton's KD term): NCE over memory banks of
embeddings, with negatives drawn from other classes."""
from __future__ import annotations

import math

import numpy as np
import torch
from omegaconf import OmegaConf

from kdbench.config import CONF_DIR
from kdbench.distill import create_method
from tests.conftest import make_batch, REPO, make_pair
from tests.helpers import close, method_options, rand64


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


def test_crd_loss_banks_and_z_match_numpy_and_survive_a_state_dict_round_trip():
    pair = make_pair("resnet14", "resnet8", n_train=40)
    method = create_method(method_options("crd", nce_k=5), pair).double()
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
    fresh = create_method(method_options("crd", nce_k=5), pair).double()
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.z, z) and torch.equal(fresh.bank_s, method.bank_s)
    assert {"bank_s", "bank_t", "z"} <= set(method.state_dict())


def test_crd_sampler_draws_other_class_negatives_exactly_relaxed_or_with_replacement():
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


def test_crd_k_is_clamped_to_the_dataset_and_crd_kd_adds_the_kd_term():
    pair = make_pair("resnet14", "resnet8", n_train=40)
    crd = create_method(method_options("crd"), pair)
    assert crd.nce_k == 40 and crd.bank_s.shape == (40, 128)
    crd_kd = create_method(method_options("crd_kd"), pair)
    assert "kd" in crd_kd.weights and "kd" not in crd.weights
    batch = make_batch(4, 10)
    s_out = pair.student.forward_taps(batch.inputs, crd.student_taps)
    t_out = pair.teacher.forward_taps(batch.inputs, crd.teacher_taps)
    assert set(crd_kd.all_terms(batch, s_out, t_out)) == {"ce", "crd", "kd"}
    assert set(crd.all_terms(batch, s_out, t_out)) == {"ce", "crd"}
    assert OmegaConf.load(CONF_DIR / "method" / "crd_kd.yaml").label == "crd_kd"
