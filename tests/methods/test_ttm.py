"""ttm and wttm (transformed teacher matching, Zheng & Yang ICLR 2024): KL from the power-transformed teacher
p_t^gamma / sum p_t^gamma to the un-tempered student; WTTM weights each sample by sum_c p_t^gamma."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdbench.distill import create_method
from kdbench.errors import KDBenchError
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair
from tests.helpers import close, method_options, np_kl, np_softmax, rand64


def np_transformed(z_t, gamma):
    powered = np_softmax(z_t) ** gamma
    return powered / powered.sum(), powered.sum()


@pytest.mark.parametrize("gamma", [0.1, 0.5, 1.0])
def test_ttm_and_wttm_match_numpy_power_transform(gamma):
    from kdbench.methods.ttm import ttm_loss, wttm_loss

    z_s, z_t = rand64(5, 7, seed=20, scale=2.0), rand64(5, 7, seed=21, scale=4.0)
    kls, weights = [], []
    for i in range(5):
        q, u = np_transformed(z_t[i].numpy(), gamma)
        kls.append(np_kl(q, np_softmax(z_s[i].numpy())))
        weights.append(u)
    close(ttm_loss(z_s, z_t, gamma), float(np.mean(kls)))
    close(wttm_loss(z_s, z_t, gamma), float(np.mean(np.array(weights) * np.array(kls))))


def test_the_power_transform_is_the_teacher_at_temperature_one_over_gamma_and_gamma_one_is_plain_kl():
    from kdbench.methods.kd import kd_loss
    from kdbench.methods.ttm import transformed_teacher, ttm_loss, wttm_loss

    z_s, z_t = rand64(3, 6, seed=22), rand64(3, 6, seed=23, scale=3.0)
    log_q, log_u = transformed_teacher(z_t, 0.25)
    np.testing.assert_allclose(log_q.exp().numpy(), torch.softmax(z_t / 4.0, 1).numpy(), rtol=1e-12)
    assert (log_u > 0).all()  # sum_c p^gamma >= 1 for gamma < 1
    close(ttm_loss(z_s, z_t, 1.0), float(kd_loss(z_s, z_t, 1.0)))  # gamma 1: KD at T = 1
    close(wttm_loss(z_s, z_t, 1.0), float(kd_loss(z_s, z_t, 1.0)))  # U = 1


def test_the_log_domain_transform_survives_a_teacher_probability_that_underflows():
    from kdbench.methods.ttm import wttm_loss

    z_t = torch.tensor([[200.0, 0.0, -200.0]])  # p_t of the last class ~ e^-400: 0 in float32
    z_s = torch.zeros(1, 3, requires_grad=True)
    loss = wttm_loss(z_s, z_t, 0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z_s.grad).all()


@pytest.mark.parametrize("name", ["ttm", "wttm"])
def test_ttm_methods_send_no_gradient_to_the_teacher_and_add_no_parameters(benchmark_pair, name):
    method = create_method(method_options(name), benchmark_pair)
    assert count_parameters(method) == 0
    z_s = rand64(4, 100, seed=24).float().requires_grad_()
    z_t = rand64(4, 100, seed=25).float().requires_grad_()
    total, terms = method.loss(make_batch(4, 100), {"logits": z_s}, {"logits": z_t}, 1)
    assert set(terms) == {"ce", name}
    total.backward()
    assert z_t.grad is None and z_s.grad.abs().sum() > 0


def test_ttm_refuses_a_non_positive_gamma():
    with pytest.raises(KDBenchError, match="gamma"):
        create_method(method_options("wttm", gamma=0.0), make_pair("resnet14", "resnet8"))


@pytest.mark.slow
@pytest.mark.parametrize("name,student", [("ttm", "resnet8x4"), ("wttm", "resnet8x4"), ("wttm", "ShuffleV2")])
def test_ttm_jobs_run_from_resnet32x4(run_job, random_teacher_checkpoint, name, student):
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet32x4", f"student={student}", f"method={name}",
                     f"teacher.checkpoint={random_teacher_checkpoint}")
    assert record["status"] == "completed" and record["extra_params"] == 0
    assert set(record["history"][0]["train"]) == {"loss", "ce", name}
