"""nkd (normalized KD, Yang et al. ICCV 2023): the teacher's target probability as a soft label (T = 1) plus a
cross-entropy between the renormalised non-target distributions at T (weight gamma)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.distill import create_method
from kdbench.errors import IncompatibleModels, KDBenchError
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair
from tests.helpers import close, method_options, np_softmax, rand64


def np_nkd(z_s, z_t, y, temperature):
    """(target, non-target) terms by explicit loops over samples and classes."""
    tgt = non = 0.0
    n, k = z_s.shape
    for b in range(n):
        tgt += -np_softmax(z_t[b])[y[b]] * math.log(np_softmax(z_s[b])[y[b]])
        others = [c for c in range(k) if c != y[b]]
        q_t = np_softmax(z_t[b][others] / temperature)
        q_s = np_softmax(z_s[b][others] / temperature)
        non += -sum(q_t[i] * math.log(q_s[i]) for i in range(k - 1))
    return tgt / n, temperature**2 * non / n


@pytest.mark.parametrize("temperature", [3.0, 1.0])
def test_nkd_terms_match_explicit_loops(temperature):
    from kdbench.methods.nkd import nkd_non_target_loss, nkd_target_loss

    z_s, z_t = rand64(5, 6, seed=30, scale=2.0), rand64(5, 6, seed=31, scale=3.0)
    y = torch.tensor([0, 5, 2, 2, 3])
    tgt, non = np_nkd(z_s.numpy(), z_t.numpy(), y.numpy(), temperature)
    close(nkd_target_loss(z_s, z_t, y), tgt)
    close(nkd_non_target_loss(z_s, z_t, y, temperature), non)


def test_drop_target_keeps_the_other_columns_in_order():
    from kdbench.methods.nkd import drop_target, gather_target

    x = torch.arange(12.0).view(3, 4)
    y = torch.tensor([0, 3, 1])
    assert drop_target(x, y).tolist() == [[1, 2, 3], [4, 5, 6], [8, 10, 11]]
    assert gather_target(x, y).tolist() == [0, 7, 9]


def test_nkd_non_target_part_is_normalised_unlike_dkd_nckd_scaled_by_the_non_target_mass():
    """NKD's non-target CE does not depend on how much mass the teacher puts on the target (the normalisation)."""
    from kdbench.methods.nkd import nkd_non_target_loss

    z_s, z_t = rand64(2, 5, seed=32), rand64(2, 5, seed=33)
    y = torch.tensor([1, 4])
    boosted = z_t.clone()
    boosted[0, 1] += 5.0
    boosted[1, 4] -= 3.0
    close(nkd_non_target_loss(z_s, z_t, y, 2.0), float(nkd_non_target_loss(z_s, boosted, y, 2.0)), tol=1e-12)


def test_nkd_sends_no_gradient_to_the_teacher_and_adds_no_parameters(benchmark_pair):
    method = create_method(method_options("nkd"), benchmark_pair)
    assert count_parameters(method) == 0 and method.temperature == 3.0
    z_s = rand64(4, 100, seed=34).float().requires_grad_()
    z_t = rand64(4, 100, seed=35).float().requires_grad_()
    batch = make_batch(4, 100, indices=[3, 50, 99, 0])
    total, terms = method.loss(batch, {"logits": z_s}, {"logits": z_t}, 1)
    assert set(terms) == {"ce", "nkd_target", "nkd_non_target"}
    close(total, float((terms["ce"] + terms["nkd_target"] + 3.5 * terms["nkd_non_target"]).detach()), tol=1e-6)
    total.backward()
    assert z_t.grad is None and z_s.grad.abs().sum() > 0


def test_nkd_refuses_two_classes_and_a_bad_temperature():
    with pytest.raises(IncompatibleModels, match="nkd"):
        create_method(method_options("nkd"), make_pair("mlp_1200x2", "mlp_32", 2, (1, 8, 8)))
    with pytest.raises(KDBenchError, match="temperature"):
        create_method(method_options("nkd", temperature=-1.0), make_pair("resnet14", "resnet8"))


@pytest.mark.slow
@pytest.mark.parametrize("student", ["resnet8x4", "ShuffleV2"])
def test_nkd_job_runs_from_resnet32x4(run_job, random_teacher_checkpoint, student):
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet32x4", f"student={student}", "method=nkd",
                     f"teacher.checkpoint={random_teacher_checkpoint}")
    assert record["status"] == "completed" and record["extra_params"] == 0
    assert set(record["history"][0]["train"]) == {"loss", "ce", "nkd_target", "nkd_non_target"}
