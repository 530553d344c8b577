"""ae_kd (AE-KD): the teachers' KD losses weighted by the min-norm point of their logit gradients on the simplex capped
at the tolerance C. The weights are checked against an exhaustive active-set solution of the same quadratic program
(NumPy, below) and the two-teacher closed form, the losses against explicit loops."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kdbench.distill import create_method, method_class
from kdbench.errors import KDBenchError
from kdbench.losses import kd_loss
from kdbench.methods.ae_kd import ae_kd_loss, ae_kd_weights, logit_gradients, min_norm_weights, svm_nu
from kdbench.methods.kd_avg import kd_avg_loss
from kdbench.methods.teacher_ensemble import ensemble_outputs
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch, resolve_job
from tests.helpers import close, method_options, np_kl, np_softmax, rand64
from tests.methods.multi_teacher_helpers import ensemble_pair, teacher_checkpoint, teachers_overrides  # noqa: F401

T = 4.0


def brute_force_weights(gram: np.ndarray, cap: float) -> np.ndarray:
    """argmin 1/2 a^T G a over {sum a = 1, 0 <= a <= cap} by trying every assignment of each weight to 0, to the cap,
    or free (the free ones from the equality-constrained KKT system), keeping the feasible one of least value."""
    m = gram.shape[0]
    best_value, best = np.inf, None
    for assign in itertools.product((0, 1, 2), repeat=m):
        upper = [i for i in range(m) if assign[i] == 1]
        free = [i for i in range(m) if assign[i] == 2]
        a = np.zeros(m)
        a[upper] = cap
        rest = 1.0 - cap * len(upper)
        if free:
            k = len(free)
            kkt = np.zeros((k + 1, k + 1))
            kkt[:k, :k], kkt[:k, k], kkt[k, :k] = gram[np.ix_(free, free)], 1.0, 1.0
            rhs = np.zeros(k + 1)
            rhs[:k] = -cap * gram[np.ix_(free, upper)].sum(1)
            rhs[k] = rest
            try:
                a[free] = np.linalg.solve(kkt, rhs)[:k]
            except np.linalg.LinAlgError:
                continue
        elif abs(rest) > 1e-12:
            continue
        if a.min() < -1e-12 or a.max() > cap + 1e-12 or abs(a.sum() - 1) > 1e-9:
            continue
        value = 0.5 * a @ gram @ a
        if value < best_value - 1e-15:
            best_value, best = value, a
    return best


def _gram(m, d=7, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(m, d)) * rng.uniform(0.2, 3.0, size=(m, 1))
    return v, v @ v.T


# ----------------------------------------------------------------------------- the weights


@pytest.mark.parametrize("m", [2, 3, 4, 5])
@pytest.mark.parametrize("tolerance", [0.3, 0.6, 0.9, 1.5])
def test_the_weights_are_the_min_norm_point_of_the_simplex_capped_at_the_tolerance(m, tolerance):
    _, gram = _gram(m, seed=10 * m + int(10 * tolerance))
    want = brute_force_weights(gram, min(max(tolerance, 1 / m), 1.0))
    got = min_norm_weights(gram, tolerance)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert abs(got.sum() - 1) < 1e-9


def test_two_teachers_get_the_closed_form_weights():
    v, gram = _gram(2, seed=3)
    cap = 0.6
    a1 = (gram[1, 1] - gram[0, 1]) / (gram[0, 0] + gram[1, 1] - 2 * gram[0, 1])  # unconstrained min-norm, then clipped
    a1 = min(max(a1, 1 - cap), cap)
    np.testing.assert_allclose(ae_kd_weights(torch.tensor(v), 0.6).numpy(), [a1, 1 - a1], atol=1e-6)


def test_the_tolerance_sets_nu_as_the_code_does():
    assert svm_nu(3, 0.6) == pytest.approx(1 / 1.8) and svm_nu(3, 0.2) == 1.0 and svm_nu(3, 5.0) == pytest.approx(1 / 3)


def test_a_tolerance_at_most_one_over_m_is_the_plain_average_and_one_teacher_weighs_one():
    _, gram = _gram(3, seed=4)
    np.testing.assert_allclose(min_norm_weights(gram, 0.2), [1 / 3] * 3)
    np.testing.assert_allclose(min_norm_weights(gram[:1, :1], 0.6), [1.0])
    zs, zt = rand64(4, 6, seed=1, scale=2.0), rand64(3, 4, 6, seed=2, scale=3.0)
    loss, w = ae_kd_loss(zs, zt, T, tolerance=0.2)
    close(loss, float(kd_avg_loss(zs, zt, T, "losses")))  # C <= 1/M: AE-KD is AVER
    loss, w = ae_kd_loss(zs, zt[:1], T)
    close(loss, float(kd_loss(zs, zt[0], T)))


def test_a_raw_gram_matrix_below_libsvms_tolerance_leaves_the_starting_point_and_rescaling_solves_it():
    """The code hands libsvm the raw Gram matrix; at CIFAR-scale gradients (entries ~1e-8) libsvm stops at its start:
    the cap for the first teacher, the rest of the mass on the second, 0 for the third (C 0.6, three teachers)."""
    v, gram = _gram(3, seed=5)
    small = torch.tensor(v * 1e-4)
    np.testing.assert_allclose(ae_kd_weights(small, 0.6).numpy(), [0.6, 0.4, 0.0], atol=1e-6)
    np.testing.assert_allclose(ae_kd_weights(small, 0.6, rescale_gram=True).numpy(), brute_force_weights(gram, 0.6),
                               atol=1e-6)


def test_normalized_gradients_solve_on_unit_vectors_and_map_the_weights_back():
    v, _ = _gram(3, seed=6)
    norms = np.linalg.norm(v, axis=1)
    u = v / norms[:, None]
    a = brute_force_weights(u @ u.T, 0.6) / norms
    np.testing.assert_allclose(ae_kd_weights(torch.tensor(v), 0.6, normalize=True).numpy(), a / a.sum(), atol=1e-6)


# ----------------------------------------------------------------------------- gradients and losses


def test_logit_gradients_are_the_autograd_gradients_of_each_teachers_kd_loss():
    zs, zt = rand64(5, 6, seed=7, scale=2.0), rand64(3, 5, 6, seed=8, scale=2.0)
    got = logit_gradients(zs, zt, T)
    for m in range(3):
        leaf = zs.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(kd_loss(leaf, zt[m], T), leaf)
        torch.testing.assert_close(got[m].double(), grad, rtol=1e-5, atol=1e-8)


def _np_kl_table(zs, zt):
    """T^2 KL(p_m,i || q_i) for every teacher m and sample i, from explicit loops."""
    q = [np_softmax(row / T) for row in zs.numpy()]
    return np.array([[T**2 * np_kl(np_softmax(zt[m, i].numpy() / T), q[i]) for i in range(zs.shape[0])]
                     for m in range(zt.shape[0])])


def test_the_batch_loss_weights_each_teachers_kd_loss_by_the_batch_mean_gradient_solution():
    zs, zt = rand64(6, 5, seed=9, scale=2.0), rand64(3, 6, 5, seed=10, scale=3.0)
    q = np.stack([np_softmax(r / T) for r in zs.numpy()])
    g = np.stack([T * (q - np.stack([np_softmax(r / T) for r in zt[m].numpy()])) / 6 for m in range(3)])
    v = g.mean(1)  # the code averages the logit gradients over the batch
    want_w = brute_force_weights(v @ v.T / (v @ v.T).diagonal().max(), 0.6)
    loss, w = ae_kd_loss(zs, zt, T, 0.6, "batch", rescale_gram=True)
    np.testing.assert_allclose(w.numpy(), want_w, atol=1e-6)
    kl = _np_kl_table(zs, zt)
    close(loss, float((w.double().numpy()[:, None] * kl).sum() / 6))


def test_per_sample_weights_solve_one_problem_per_sample():
    zs, zt = rand64(4, 5, seed=11, scale=2.0), rand64(3, 4, 5, seed=12, scale=3.0)
    loss, w = ae_kd_loss(zs, zt, T, 0.6, "sample", rescale_gram=True)
    assert w.shape == (4, 3)
    grads = logit_gradients(zs, zt, T).double().numpy()
    for i in range(4):
        gram = grads[:, i] @ grads[:, i].T
        np.testing.assert_allclose(w[i].numpy(), brute_force_weights(gram / gram.diagonal().max(), 0.6), atol=1e-5)
    kl = _np_kl_table(zs, zt)
    close(loss, float((w.double().numpy().T * kl).sum() / 4))


def test_the_weights_are_constants_and_no_gradient_reaches_the_teachers():
    zs = rand64(4, 5, seed=13, scale=2.0).requires_grad_(True)
    zt = rand64(2, 4, 5, seed=14, scale=2.0).requires_grad_(True)
    loss, w = ae_kd_loss(zs, zt, T)
    assert not w.requires_grad
    loss.backward()
    assert zt.grad is None and zs.grad.abs().sum() > 0
    # d loss / d z_s = sum_m w_m g_m: the weights do not move with the student
    g = logit_gradients(zs, zt, T)
    torch.testing.assert_close(zs.grad, (w.double()[:, None, None] * g.double()).sum(0), rtol=1e-5, atol=1e-9)


def test_an_unknown_granularity_and_a_nonpositive_tolerance_are_refused():
    pair = ensemble_pair(("resnet8", "resnet8"), "resnet8")
    with pytest.raises(KDBenchError, match="granularity"):
        create_method(method_options("ae_kd", granularity="class"), pair)
    with pytest.raises(KDBenchError, match="tolerance"):
        create_method(method_options("ae_kd", tolerance=0.0), pair)


# ----------------------------------------------------------------------------- the method


def test_the_defaults_are_the_readmes_flags():
    cfg = method_options("ae_kd")
    assert (cfg.temperature, cfg.tolerance, cfg.granularity, cfg.normalize_gradients, cfg.rescale_gram) == \
        (4.0, 0.6, "batch", False, False)
    assert dict(cfg.weights) == {"ce": 1.0, "aekd": 0.9}


def test_the_method_weights_every_teacher_it_is_given_and_adds_no_parameters():
    pair = ensemble_pair(("resnet8", "resnet14", "resnet8"), "resnet8", seed=3)
    method = create_method(method_options("ae_kd"), pair)
    assert method_class("ae_kd").multi_teacher and count_parameters(method) == 0
    batch = make_batch(6, 10)
    outs = []
    for t in pair.teachers:
        t.eval()
        with torch.no_grad():
            outs.append(t.forward_taps(batch.inputs, method.teacher_taps))
    s = pair.student.forward_taps(batch.inputs, method.student_taps)
    _, terms = method.loss(batch, s, ensemble_outputs(outs), 1)
    want, w = ae_kd_loss(s["logits"], torch.stack([o["logits"] for o in outs]), T)
    assert set(terms) == {"ce", "aekd"} and method.last_weights.shape == (3,)
    close(terms["aekd"], float(want.detach()))
    fields = method.record_fields()
    assert fields["n_teachers"] == 3 and fields["evaluated_head"] == "student"
    assert "C=0.6" in fields["teacher_weighting"]


def test_the_experiments_teachers_are_the_benchmark_recipes_one_store_entry_per_seed():
    crd = resolve_job(["experiment=crd_cifar100_same", "pair=resnet56-resnet20", "method=kd"]).teacher
    for experiment, arch in (("ae_kd_cifar100", "resnet56"), ("ae_kd_cifar100_resnet50", "ResNet50")):
        job = resolve_job([f"experiment={experiment}", "method=ae_kd"])
        assert job.optim.nesterov and job.labels["teacher"] == "+".join([arch] * 3)
        assert [t.job.seed for t in job.teachers] == [0, 1, 2] and len({t.entry for t in job.teachers}) == 3
        assert all(not t.job.optim.nesterov and t.job.trainer.epochs == 240 for t in job.teachers)
    assert resolve_job(["experiment=ae_kd_cifar100", "method=kd_avg"]).teachers[0].entry == crd.entry


def test_a_job_with_two_teachers_trains_with_adaptive_weights(run_job, teacher_checkpoint):
    rec = run_job(*TINY_SYNTHETIC, "student=resnet8", "method=ae_kd",
                  *teachers_overrides(teacher_checkpoint, "resnet8", "resnet8"))
    assert rec["status"] == "completed" and rec["teacher"] == "resnet8+resnet8"
    assert set(rec["history"][0]["train"]) == {"loss", "ce", "aekd"} and rec["extra_params"] == 0
    assert rec["n_teachers"] == 2 and rec["evaluated_head"] == "student"


@pytest.mark.slow
@pytest.mark.parametrize("teachers, student, options", [
    (("resnet32x4", "resnet32x4"), "resnet8x4", []),
    (("vgg13", "resnet32x4", "vgg13"), "MobileNetV2", ["method.granularity=sample", "method.rescale_gram=true"])])
def test_jobs_on_the_benchmark_pair_and_a_cross_architecture_ensemble(run_job, teacher_checkpoint, teachers, student,
                                                                      options):
    rec = run_job(*TINY_SYNTHETIC, f"student={student}", "method=ae_kd",
                  *teachers_overrides(teacher_checkpoint, *teachers), *options)
    assert rec["status"] == "completed" and rec["teacher"] == "+".join(teachers)
    assert set(rec["history"][0]["train"]) == {"loss", "ce", "aekd"} and rec["extra_params"] == 0
