"""ctkd (curriculum temperature KD): the gradient-reversal layer, the cosine curriculum (against the reference run's
logged values), the KD at a learned temperature (against NumPy loops), how the temperature learns, and end-to-end runs
where the learned temperature reaches the record."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.distill import create_method
from kdbench.methods.common import standardize_logits
from kdbench.methods.ctkd import cosine_lambda, reverse_gradient, temperature_kd_loss
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair
from tests.helpers import close, method_options, rand64


def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def np_temperature_kd(zs, zt, temps, eps=0.0):
    """mean_i T_i^2 sum_c q_ic (log q_ic - log p_ic), q = softmax(z_t/T_i) + eps, by explicit loops."""
    total = 0.0
    for i in range(zs.shape[0]):
        T = temps[i] if len(temps) > 1 else temps[0]
        q, p = np_softmax(zt[i] / T) + eps, np_softmax(zs[i] / T)
        total += T * T * sum(q[c] * (math.log(q[c]) - math.log(p[c])) for c in range(len(q)))
    return total / zs.shape[0]


def build(**options):
    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16), 40)
    return create_method(method_options("ctkd", **options), pair), pair


# ----------------------------------------------------------------------------- the pieces


def test_gradient_reversal_is_the_identity_forward_and_scales_the_gradient_by_lambda():
    x = torch.tensor([0.3, -1.2], requires_grad=True)
    y = reverse_gradient(x, -0.5)
    assert torch.equal(y, x.detach())
    (3.0 * y).sum().backward()
    assert x.grad.tolist() == [-1.5, -1.5]  # no sign flip of its own: the reversal is a negative lambda


def test_cosine_curriculum_matches_the_reference_runs_logged_decay_values():
    """logit-standardization-KD logs/CTKD/ctkd,resnet32x4,resnet8x4,2,9.txt records 'decay_value' per epoch."""
    logged = {1: -0.02447174185242318, 2: -0.09549150281252627, 3: -0.20610737385376343, 4: -0.3454915028125263}
    for epoch, value in logged.items():
        assert cosine_lambda(epoch) == pytest.approx(value, abs=1e-12)
    assert cosine_lambda(0) == 0.0 and cosine_lambda(5) == pytest.approx(-0.5)
    assert cosine_lambda(10) == pytest.approx(-1.0) and cosine_lambda(240) == pytest.approx(-1.0)


@pytest.mark.parametrize("per_sample, eps", [(False, 0.0), (True, 1e-7), (False, 1e-7)])
def test_kd_at_a_learned_temperature_matches_explicit_loops(per_sample, eps):
    zs, zt = rand64(5, 7, seed=1, scale=3), rand64(5, 7, seed=2, scale=3)
    temps = torch.tensor([1.5, 3.0, 7.25, 15.6, 20.9], dtype=torch.float64) if per_sample \
        else torch.tensor([4.5], dtype=torch.float64)
    close(temperature_kd_loss(zs, zt, temps, eps), np_temperature_kd(zs.numpy(), zt.numpy(), temps.numpy(), eps))


def test_a_single_temperature_is_hintons_kd():
    from kdbench.losses import kd_loss
    zs, zt = rand64(4, 6, seed=3), rand64(4, 6, seed=4)
    close(temperature_kd_loss(zs, zt, torch.tensor([4.0], dtype=torch.float64)), float(kd_loss(zs, zt, 4.0)))


# ----------------------------------------------------------------------------- the method


def test_the_temperature_starts_at_15_62_and_is_logged_with_weight_zero():
    method, pair = build()
    batch = make_batch(6, 10)
    s = pair.student.forward_taps(batch.inputs)
    with torch.no_grad():
        t = pair.teacher.forward_taps(batch.inputs)
    total, terms = method.loss(batch, s, t, 1)
    close(terms["temperature"], 1 + 20 / (1 + math.exp(-1)))  # 1 + 20 sigmoid(1) = 15.6212
    close(total, float((0.1 * terms["ce"] + 0.9 * terms["kd"]).detach()), 1e-6)
    assert method.term_weights(1)["temperature"] == 0.0


def test_the_temperature_parameter_ascends_the_kd_loss_with_the_curriculum_strength():
    """d total / d theta = lambda(epoch) * w_kd * dKD/dT * dT/dtheta; dKD/dT by central differences."""
    method, pair = build()
    method.double()
    zs = rand64(6, 10, seed=5, scale=2).requires_grad_()
    zt = rand64(6, 10, seed=6, scale=2)
    batch = make_batch(6, 10)
    theta = method.temperature_module.module.theta
    T = 1 + 20 * torch.sigmoid(theta.detach())
    h = 1e-5
    dkd_dt = (temperature_kd_loss(zs.detach(), zt, T + h) - temperature_kd_loss(zs.detach(), zt, T - h)) / (2 * h)
    dt_dtheta = 20 * torch.sigmoid(theta.detach()) * (1 - torch.sigmoid(theta.detach()))
    student_grads = []
    for epoch in (1, 4, 10, 200):
        theta.grad, zs.grad = None, None
        total, _ = method.loss(batch, {"logits": zs}, {"logits": zt}, epoch)
        total.backward()
        want = cosine_lambda(epoch) * 0.9 * dkd_dt * dt_dtheta
        close(theta.grad, float(want), 1e-5)
        student_grads.append(zs.grad.clone())
    for g in student_grads[1:]:  # the reversal touches the temperature only
        torch.testing.assert_close(g, student_grads[0])


def test_no_gradient_reaches_the_teacher():
    method, _ = build()
    zs, zt = rand64(4, 10, seed=7).float().requires_grad_(), rand64(4, 10, seed=8).float().requires_grad_()
    total, _ = method.loss(make_batch(4, 10), {"logits": zs}, {"logits": zt}, 3)
    total.backward()
    assert zt.grad is None and zs.grad.abs().sum() > 0


def test_the_temperature_is_a_trainable_parameter_of_the_method(benchmark_pair):
    method = create_method(method_options("ctkd"), benchmark_pair)
    params = list(method.trainable_parameters())
    assert count_parameters(method) == 1 and params[0] is method.temperature_module.module.theta
    assert params[0].item() == 1.0


def test_the_instance_wise_module_gives_one_temperature_per_sample_from_detached_logits(benchmark_pair):
    method = create_method(method_options("ctkd", temperature_module="instance"), benchmark_pair)
    assert count_parameters(method) == 200 * 256 + 256 + 256 + 1  # Linear(2C, 256) + Linear(256, 1), C = 100
    assert method.teacher_eps == 1e-7
    zs = rand64(5, 100, seed=9).float().requires_grad_()
    zt = rand64(5, 100, seed=10).float()
    temps = method.temperature_module(zs, zt, 20)
    assert temps.shape == (5,) and ((temps > 1) & (temps < 21)).all() and temps.std() > 0
    _, terms = method.loss(make_batch(5, 100), {"logits": zs}, {"logits": zt}, 20)
    close(terms["kd"], np_temperature_kd(zs.detach().double().numpy(), zt.double().numpy(),
                                          temps.detach().double().numpy(), 1e-7), 1e-5)
    close(terms["temperature"], float(temps.detach().mean()), 1e-6)
    # the student's gradient does not pass through the module: the same as with the temperatures held fixed
    terms["kd"].backward()
    fixed = zs.detach().clone().requires_grad_()
    temperature_kd_loss(fixed, zt, temps.detach(), 1e-7).backward()
    torch.testing.assert_close(zs.grad, fixed.grad)
    assert all(p.grad is not None for p in method.temperature_module.parameters())


def test_logit_standardization_standardizes_only_inside_the_kd_term():
    method, _ = build(logit_standardization=True)
    zs, zt = rand64(6, 10, seed=11, scale=4), rand64(6, 10, seed=12, scale=4)
    method.double()
    _, terms = method.loss(make_batch(6, 10), {"logits": zs}, {"logits": zt}, 2)
    T = torch.tensor([1 + 20 / (1 + math.exp(-1))], dtype=torch.float64)
    close(terms["kd"], float(temperature_kd_loss(standardize_logits(zs), standardize_logits(zt), T)))
    close(terms["ce"], float(torch.nn.functional.cross_entropy(zs, make_batch(6, 10).targets)))


def test_an_unknown_temperature_module_is_refused():
    with pytest.raises(ValueError, match="temperature_module"):
        build(temperature_module="layerwise")


# ----------------------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
@pytest.mark.parametrize("student", ["resnet8x4", "ShuffleV2"])
def test_ctkd_job_learns_its_temperature_and_records_it(run_job, random_teacher_checkpoint, tmp_path, student):
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet32x4", f"student={student}", "method=ctkd",
                     f"teacher.checkpoint={random_teacher_checkpoint}")
    assert record["status"] == "completed" and record["extra_params"] == 1
    train = record["history"][0]["train"]
    assert set(train) == {"loss", "ce", "kd", "temperature"} and 1.0 < train["temperature"] < 21.0
    theta = torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)["method"]["temperature_module.module.theta"]
    assert theta.item() != 1.0  # SGD moved it
