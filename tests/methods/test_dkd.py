"""dkd (decoupled KD): KD split into a target-class term (TCKD) and a non-target term (NCKD), warmed up linearly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdbench.distill import create_method
from tests.conftest import make_pair
from tests.helpers import close, method_options, np_softmax, rand64


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


def test_dkd_warms_up_only_its_distillation_terms_and_takes_beta_from_the_config():
    pair = make_pair("resnet14", "resnet8")
    m = create_method(method_options("dkd"), pair)
    assert m.term_weights(1) == pytest.approx({"ce": 1.0, "tckd": 0.05, "nckd": 0.4})
    assert m.term_weights(10) == pytest.approx({"ce": 1.0, "tckd": 0.5, "nckd": 4.0})
    assert m.term_weights(20) == m.term_weights(240) == {"ce": 1.0, "tckd": 1.0, "nckd": 8.0}
    m2 = create_method(method_options("dkd", **{"weights.nckd": 2.0}), pair)
    assert m2.term_weights(40)["nckd"] == 2.0
