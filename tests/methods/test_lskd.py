"""lskd (logit standardization, Sun et al. CVPR 2024): KD on per-sample z-scored logits, T 2, weight 9; and
lskd_per_pair, the (T, weight) of the authors' released logs looked up by pair."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdbench.distill import create_method
from kdbench.errors import IncompatibleModels, KDBenchError
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair, method_config
from tests.helpers import close, method_options, np_kl, np_softmax, rand64


def np_standardize(z, eps=1e-7, ddof=1):
    return (z - z.mean()) / (eps + z.std(ddof=ddof))


def test_standardize_logits_z_scores_each_row_with_the_unbiased_std_plus_eps():
    from kdbench.methods.lskd import standardize_logits

    z = rand64(3, 7, seed=1, scale=3.0) + 5.0
    for unbiased, ddof in ((True, 1), (False, 0)):
        got = standardize_logits(z, eps=1e-7, unbiased=unbiased).numpy()
        for i in range(3):
            np.testing.assert_allclose(got[i], np_standardize(z[i].numpy(), 1e-7, ddof), rtol=1e-12, atol=1e-12)
    got = standardize_logits(z).numpy()
    np.testing.assert_allclose(got.mean(1), 0.0, atol=1e-12)
    np.testing.assert_allclose(got.std(1, ddof=1), 1.0 / (1.0 + 1e-7 / z.numpy().std(1, ddof=1)), rtol=1e-12)
    # eps is added to the std, not inside the root: a constant row maps to zeros, not NaN
    flat = standardize_logits(torch.full((1, 5), 3.0, dtype=torch.float64))
    assert torch.equal(flat, torch.zeros(1, 5, dtype=torch.float64))
    # a hand-worked row: z = [1, 2, 3], mean 2, unbiased std 1 -> [-1, 0, 1] / (1 + eps)
    np.testing.assert_allclose(standardize_logits(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64), eps=0.5)
                               .numpy(), [[-1 / 1.5, 0.0, 1 / 1.5]], rtol=1e-12)


@pytest.mark.parametrize("temperature", [2.0, 1.0, 4.0])
def test_lskd_loss_is_t_squared_kl_between_standardised_softened_posteriors(temperature):
    from kdbench.methods.lskd import lskd_loss

    z_s, z_t = rand64(5, 8, seed=2, scale=2.0), rand64(5, 8, seed=3, scale=6.0)
    expected = 0.0
    for i in range(5):
        p_t = np_softmax(np_standardize(z_t[i].numpy()) / temperature)
        p_s = np_softmax(np_standardize(z_s[i].numpy()) / temperature)
        expected += np_kl(p_t, p_s)
    close(lskd_loss(z_s, z_t, temperature), temperature**2 * expected / 5)


def test_lskd_ignores_the_scale_and_shift_of_either_sides_logits():
    """The point of the method: a student whose logits are an affine copy of the teacher's has (almost) zero loss."""
    from kdbench.methods.lskd import lskd_loss
    from kdbench.methods.kd import kd_loss

    z_t = rand64(4, 10, seed=4, scale=3.0)
    z_s = 0.25 * z_t - 7.0
    assert float(lskd_loss(z_s, z_t, 2.0)) < 1e-10
    assert float(kd_loss(z_s, z_t, 2.0)) > 0.1  # plain KD punishes the magnitude mismatch


def test_lskd_sends_no_gradient_to_the_teacher_and_trains_the_student():
    from kdbench.methods.lskd import lskd_loss

    z_s = rand64(4, 10, seed=5).requires_grad_()
    z_t = rand64(4, 10, seed=6).requires_grad_()
    lskd_loss(z_s, z_t, 2.0).backward()
    assert z_t.grad is None and z_s.grad is not None and z_s.grad.abs().sum() > 0


def test_lskd_method_terms_and_defaults_on_resnet32x4_to_resnet8x4(benchmark_pair):
    from kdbench.methods.lskd import lskd_loss

    method = create_method(method_options("lskd"), benchmark_pair)
    assert count_parameters(method) == 0 and method.temperature == 2.0
    assert dict(method.weights) == {"ce": 0.1, "lskd": 9.0}
    z_s, z_t = rand64(3, 100, seed=7, scale=2.0).float(), rand64(3, 100, seed=8, scale=5.0).float()
    batch = make_batch(3, 100)
    total, terms = method.loss(batch, {"logits": z_s}, {"logits": z_t}, 1)
    close(terms["lskd"], float(lskd_loss(z_s.double(), z_t.double(), 2.0)), tol=1e-5)
    close(total, float(0.1 * terms["ce"] + 9.0 * terms["lskd"]), tol=1e-6)


@pytest.mark.parametrize("teacher,student,temperature,weight", [
    ("resnet32x4", "resnet8x4", 2.0, 9.0), ("vgg13", "vgg8", 3.0, 9.0), ("resnet110", "resnet20", 4.0, 12.0),
    ("ResNet50", "MobileNetV2", 3.0, 1.0), ("resnet32x4", "wrn_40_2", 3.0, 9.0), ("resnet56", "resnet8", 2.0, 9.0)])
def test_lskd_per_pair_takes_t_and_weight_from_the_released_logs(teacher, student, temperature, weight):
    cfg = method_config("lskd_per_pair", f"teacher={teacher}", f"student={student}")
    assert (float(cfg.temperature), float(cfg.weights.lskd), float(cfg.weights.ce)) == (temperature, weight, 0.1)
    assert cfg.name == "lskd" and cfg.label == "lskd"


def test_lskd_distills_an_mlp_pair_and_refuses_bad_options():
    pair = make_pair("mlp_1200x2", "mlp_32", 10, (1, 8, 8))
    method = create_method(method_options("lskd"), pair)
    batch = make_batch(4, 10, (1, 8, 8))
    s = pair.student.forward_taps(batch.inputs, method.student_taps)
    with torch.no_grad():
        t = pair.teacher.forward_taps(batch.inputs, method.teacher_taps)
    total, _ = method.loss(batch, s, t, 1)
    assert torch.isfinite(total)
    with pytest.raises(KDBenchError, match="temperature"):
        create_method(method_options("lskd", temperature=0.0), pair)
    with pytest.raises(IncompatibleModels, match="lskd"):
        create_method(method_options("lskd"), make_pair("mlp_1200x2", "mlp_32", 1, (1, 8, 8)))


@pytest.mark.slow
@pytest.mark.parametrize("student", ["resnet8x4", "ShuffleV2"])
def test_lskd_job_runs_from_resnet32x4(run_job, random_teacher_checkpoint, student):
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet32x4", f"student={student}", "method=lskd",
                     f"teacher.checkpoint={random_teacher_checkpoint}")
    assert record["status"] == "completed" and record["method"] == "lskd" and record["extra_params"] == 0
    assert set(record["history"][0]["train"]) == {"loss", "ce", "lskd"}
