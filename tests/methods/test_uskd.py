"""uskd (universal self-KD, Yang et al. ICCV 2023): teacher-free; a smoothed target label from the student's own
target probability, Zipf-law non-target labels from the rank of a weak head's and the student's scores, and the weak
head (on the pooled second-to-last stage) trained with label smoothing."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.distill import create_method, method_class
from kdbench.errors import IncompatibleModels, KDBenchError
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair
from tests.helpers import close, method_options, np_softmax, rand64


def np_log_softmax(z):
    return np.log(np_softmax(z))


def np_zipf_labels(z_s, z_w, y, rank_student="log_softmax"):
    """Explicit loops: scores per class, positions by a Python sort, 1 / (position + 1), target dropped, renormalised."""
    out = []
    for b in range(z_s.shape[0]):
        w = np_softmax(z_w[b])
        s = np_log_softmax(z_s[b]) if rank_student == "log_softmax" else np_softmax(z_s[b])
        t = y[b]
        scores = [w[c] / (1 - w[t] + 1e-6) + s[c] / (1 - s[t] + 1e-6) for c in range(len(w))]
        order = sorted(range(len(w)), key=lambda c: -scores[c])
        zipf = {c: 1.0 / (pos + 1) for pos, c in enumerate(order)}
        row = np.array([zipf[c] for c in range(len(w)) if c != t])
        out.append(row / row.sum())
    return np.stack(out)


@pytest.mark.parametrize("rank_student", ["log_softmax", "softmax"])
def test_uskd_terms_match_explicit_loops(rank_student):
    from kdbench.methods.uskd import (uskd_non_target_loss, uskd_target_loss, uskd_weak_loss,
                                      zipf_non_target_labels)

    n, k = 5, 7
    z_s, z_w = rand64(n, k, seed=50, scale=2.0), rand64(n, k, seed=51, scale=2.0)
    y = torch.tensor([0, 6, 3, 3, 1])
    zs, zw, yy = z_s.numpy(), z_w.numpy(), y.numpy()
    s_y2 = np.array([np_softmax(zs[b])[yy[b]] ** 2 for b in range(n)])
    soft = s_y2 + 1 - s_y2.mean()
    target = -sum(soft[b] * np_log_softmax(zs[b])[yy[b]] for b in range(n)) / n
    close(uskd_target_loss(z_s, y), target)

    smooth = np.full((n, k), 0.1 / k)
    smooth[np.arange(n), yy] += 0.9
    weak = -sum((smooth[b] * np_log_softmax(zw[b])).sum() for b in range(n)) / n
    close(uskd_weak_loss(z_w, y, 0.1), weak)

    labels = zipf_non_target_labels(z_s, z_w, y, rank_student)
    expected_labels = np_zipf_labels(zs, zw, yy, rank_student)
    np.testing.assert_allclose(labels.numpy(), expected_labels, rtol=1e-12)
    non = 0.0
    for b in range(n):
        others = [c for c in range(k) if c != yy[b]]
        non += -(expected_labels[b] * np_log_softmax(zs[b][others])).sum()
    close(uskd_non_target_loss(z_s, labels, y), non / n)


def test_zipf_labels_by_hand():
    """K = 4, label 0: scores rank classes 2, 0, 3, 1 -> zipf 1, 1/2, 1/3, 1/4 by position; drop class 0 -> [1/4, 1, 1/3]
    renormalised by 19/12."""
    from kdbench.methods.uskd import zipf_non_target_labels

    z_w = torch.tensor([[2.0, -3.0, 3.0, 0.0]], dtype=torch.float64)  # the weak head alone decides (student flat)
    z_s = torch.zeros(1, 4, dtype=torch.float64)
    got = zipf_non_target_labels(z_s, z_w, torch.tensor([0]), "softmax")
    np.testing.assert_allclose(got.numpy(), [[3 / 19, 12 / 19, 4 / 19]], rtol=1e-12)


def test_uskd_needs_no_teacher_and_its_weak_head_sits_on_the_second_to_last_stage(benchmark_pair):
    assert method_class("uskd").needs_teacher is False
    method = create_method(method_options("uskd"), benchmark_pair)
    assert method.mid_tap == "stage2" and method.student_taps == ("stage2",)
    assert count_parameters(method) == 128 * 100 + 100  # Linear(128, 100) on resnet8x4's stage2: 12,900
    pair = make_pair(None, "MobileNetV2", 100, (3, 32, 32))
    assert create_method(method_options("uskd"), pair).fc.in_features == 48  # MobileNetV2: stage3 of 4


def test_uskd_gradients_reach_the_student_and_weak_head_but_not_through_its_soft_labels():
    from kdbench.methods.uskd import uskd_target_loss, zipf_non_target_labels

    pair = make_pair(None, "resnet8")
    method = create_method(method_options("uskd"), pair)
    batch = make_batch(6, 10)
    s_out = pair.student.forward_taps(batch.inputs, method.student_taps)
    total, terms = method.loss(batch, s_out, None, 1)
    assert set(terms) == {"ce", "uskd_target", "uskd_non_target", "uskd_weak"}
    close(total, float((terms["ce"] + 0.1 * (terms["uskd_target"] + terms["uskd_non_target"] + terms["uskd_weak"]))
                       .detach()), tol=1e-6)
    terms["uskd_weak"].backward()
    assert method.fc.weight.grad.abs().sum() > 0
    assert pair.student.fc.weight.grad is None  # the weak term reaches the backbone below stage2, not the classifier
    z = rand64(3, 10, seed=52).requires_grad_()
    assert not zipf_non_target_labels(z, rand64(3, 10, seed=53), torch.tensor([1, 2, 3])).requires_grad
    # the soft target label is detached: d/dz of -mean(p~ log s_y) is -p~ * d log s_y
    y = torch.tensor([1, 2, 3])
    uskd_target_loss(z, y).backward()
    s = torch.softmax(z.detach(), 1)
    p = s.gather(1, y[:, None]) ** 2
    p = p + 1 - p.mean()
    expected = -(p / 3) * (torch.nn.functional.one_hot(y, 10) - s)
    np.testing.assert_allclose(z.grad.numpy(), expected.numpy(), rtol=1e-10, atol=1e-12)


def test_uskd_refuses_a_single_stage_student_and_bad_options():
    with pytest.raises(IncompatibleModels, match="second-to-last stage"):
        create_method(method_options("uskd"), make_pair(None, "mlp_32", 10, (1, 8, 8)))
    with pytest.raises(KDBenchError, match="rank_student"):
        create_method(method_options("uskd", rank_student="probs"), make_pair(None, "resnet8"))


@pytest.mark.slow
@pytest.mark.parametrize("student", ["resnet8x4", "ShuffleV2"])
def test_uskd_job_trains_without_a_teacher(run_job, student):
    record = run_job(*TINY_SYNTHETIC, f"student={student}", "method=uskd")
    assert record["status"] == "completed" and record["teacher"] is None
    assert set(record["history"][0]["train"]) == {"loss", "ce", "uskd_target", "uskd_non_target", "uskd_weak"}
    if student == "resnet8x4":
        assert record["extra_params"] == 128 * 10 + 10  # 10 synthetic classes
