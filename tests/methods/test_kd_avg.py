"""kd_avg: KD from the averaged soft predictions of a teacher ensemble (the AVER baseline of the multi-teacher papers),
checked against explicit loops, with every teacher of the `teachers` config reaching the loss."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.distill import create_method, method_class
from kdbench.errors import KDBenchError
from kdbench.losses import kd_loss
from kdbench.methods.kd_avg import averaged_soft_targets, kd_avg_loss
from kdbench.methods.teacher_ensemble import ENSEMBLE, ensemble_outputs
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch
from tests.helpers import close, method_options, np_kl, np_softmax, rand64
from tests.methods.multi_teacher_helpers import ensemble_pair, teacher_checkpoint, teachers_overrides  # noqa: F401

T = 4.0


def _np_probs(z, temperature):
    return np.stack([np_softmax(row / temperature) for row in z])


def test_the_kd_term_is_t2_times_the_batch_mean_kl_from_the_averaged_soft_predictions():
    zs, zt = rand64(3, 5, seed=1, scale=2.0), rand64(2, 3, 5, seed=2, scale=3.0)
    q = _np_probs(zs.numpy(), T)
    p_bar = (_np_probs(zt[0].numpy(), T) + _np_probs(zt[1].numpy(), T)) / 2
    want = T**2 * sum(np_kl(p_bar[i], q[i]) for i in range(3)) / 3
    close(kd_avg_loss(zs, zt, T, "probs"), want)
    np.testing.assert_allclose(averaged_soft_targets(zt, T).numpy(), p_bar, rtol=1e-12)


def test_the_code_variant_is_the_mean_of_one_kd_loss_per_teacher():
    zs, zt = rand64(4, 6, seed=3, scale=2.0), rand64(3, 4, 6, seed=4, scale=3.0)
    q = _np_probs(zs.numpy(), T)
    want = sum(T**2 * sum(np_kl(_np_probs(zt[m].numpy(), T)[i], q[i]) for i in range(4)) / 4 for m in range(3)) / 3
    close(kd_avg_loss(zs, zt, T, "losses"), want)


def test_both_averages_give_the_same_student_gradient_and_differ_by_the_teachers_jensen_gap():
    zt = rand64(3, 4, 6, seed=6, scale=3.0)
    grads, values = [], []
    for average in ("probs", "losses"):
        zs = rand64(4, 6, seed=5, scale=2.0).requires_grad_(True)
        loss = kd_avg_loss(zs, zt, T, average)
        loss.backward()
        grads.append(zs.grad)
        values.append(float(loss.detach()))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    entropy = lambda p: -sum(x * math.log(x) for x in p)  # noqa: E731
    p = [_np_probs(zt[m].numpy(), T) for m in range(3)]
    gap = T**2 * sum(entropy(sum(pm[i] for pm in p) / 3) - sum(entropy(pm[i]) for pm in p) / 3 for i in range(4)) / 4
    close(values[1] - values[0], gap)
    q = _np_probs(rand64(4, 6, seed=5, scale=2.0).numpy(), T)  # the gradient is T (q - p_bar) / N
    np.testing.assert_allclose(grads[0].numpy(), T * (q - sum(p) / 3) / 4, rtol=1e-9, atol=1e-12)


def test_one_teacher_is_hintons_kd_in_both_variants():
    zs, zt = rand64(5, 7, seed=7, scale=2.0), rand64(5, 7, seed=8, scale=2.0)
    for average in ("probs", "losses"):
        close(kd_avg_loss(zs, zt[None], T, average), float(kd_loss(zs, zt, T)))


def test_no_gradient_reaches_the_teachers():
    zs = rand64(3, 5, seed=9).requires_grad_(True)
    zt = rand64(2, 3, 5, seed=10).requires_grad_(True)
    kd_avg_loss(zs, zt, T).backward()
    assert zt.grad is None and zs.grad.abs().sum() > 0


def test_the_method_averages_every_teacher_it_is_given_and_adds_no_parameters():
    pair = ensemble_pair(("resnet8", "resnet14"), "resnet8")
    method = create_method(method_options("kd_avg"), pair)
    assert method_class("kd_avg").multi_teacher and count_parameters(method) == 0
    batch = make_batch(6, 10)
    outs = []
    for t in pair.teachers:
        t.eval()
        with torch.no_grad():
            outs.append(t.forward_taps(batch.inputs, method.teacher_taps))
    s = pair.student.forward_taps(batch.inputs, method.student_taps)
    teacher = ensemble_outputs(outs)
    assert teacher[ENSEMBLE].shape == (2, 6, 10) and torch.equal(teacher["logits"], outs[0]["logits"])
    _, terms = method.loss(batch, s, teacher, 1)
    stacked = torch.stack([o["logits"] for o in outs])
    assert set(terms) == {"ce", "kd"}
    close(terms["kd"], float(kd_avg_loss(s["logits"], stacked, T).detach()))
    assert not torch.isclose(terms["kd"], kd_loss(s["logits"], outs[0]["logits"], T))  # not the first teacher's KD
    assert method.record_fields()["n_teachers"] == 2 and method.record_fields()["evaluated_head"] == "student"


def test_the_defaults_are_ae_kds_aver_flags():
    cfg = method_options("kd_avg")
    assert (cfg.temperature, cfg.average, dict(cfg.weights)) == (4.0, "probs", {"ce": 1.0, "kd": 0.9})


def test_an_unknown_average_is_refused():
    with pytest.raises(KDBenchError, match="average"):
        create_method(method_options("kd_avg", average="median"), ensemble_pair(("resnet8",), "resnet8"))
    with pytest.raises(KDBenchError, match="average"):
        kd_avg_loss(rand64(2, 3), rand64(1, 2, 3), T, "median")


def test_a_job_with_two_teachers_trains_the_student_on_their_average(run_job, teacher_checkpoint):
    rec = run_job(*TINY_SYNTHETIC, "student=resnet8", "method=kd_avg",
                  *teachers_overrides(teacher_checkpoint, "resnet8", "resnet8"))
    assert rec["status"] == "completed" and rec["teacher"] == "resnet8+resnet8"
    assert set(rec["history"][0]["train"]) == {"loss", "ce", "kd"} and rec["extra_params"] == 0
    assert len(rec["teacher_sources"]) == 2 and rec["n_teachers"] == 2 and rec["evaluated_head"] == "student"


@pytest.mark.slow
@pytest.mark.parametrize("teachers, student", [(("resnet32x4", "resnet32x4"), "resnet8x4"),
                                               (("vgg13", "resnet32x4"), "MobileNetV2")])
def test_jobs_on_the_benchmark_pair_and_a_cross_architecture_ensemble(run_job, teacher_checkpoint, teachers, student):
    rec = run_job(*TINY_SYNTHETIC, f"student={student}", "method=kd_avg",
                  *teachers_overrides(teacher_checkpoint, *teachers))
    assert rec["status"] == "completed" and rec["teacher"] == "+".join(teachers)
    assert set(rec["history"][0]["train"]) == {"loss", "ce", "kd"} and rec["extra_params"] == 0
