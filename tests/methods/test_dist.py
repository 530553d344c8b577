"""dist (DIST, Huang et al. NeurIPS 2022): inter-class (per sample) and intra-class (per class, over the batch)
Pearson relations of the softened posteriors, weighted separately (CIFAR-100: tau 4, beta = gamma = 2)."""
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


def np_pearson(a, b, eps=1e-8):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (math.sqrt((a * a).sum()) * math.sqrt((b * b).sum()) + eps))


def np_posteriors(z, tau):
    return np.stack([np_softmax(row / tau) for row in z])


@pytest.mark.parametrize("tau", [4.0, 1.0])
def test_dist_terms_match_explicit_pearson_loops(tau):
    from kdbench.methods.dist import dist_inter_loss, dist_intra_loss

    z_s, z_t = rand64(6, 5, seed=10, scale=2.0), rand64(6, 5, seed=11, scale=3.0)
    y_s, y_t = np_posteriors(z_s.numpy(), tau), np_posteriors(z_t.numpy(), tau)
    inter = 1 - sum(np_pearson(y_s[b], y_t[b]) for b in range(6)) / 6
    intra = 1 - sum(np_pearson(y_s[:, c], y_t[:, c]) for c in range(5)) / 5
    close(dist_inter_loss(z_s, z_t, tau), tau**2 * inter)
    close(dist_intra_loss(z_s, z_t, tau), tau**2 * intra)


def test_pearson_by_hand_and_inter_is_zero_for_identical_posteriors_but_for_the_eps():
    from kdbench.methods.dist import dist_inter_loss, pearson_rows

    a = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 4.0, 7.0]], dtype=torch.float64)  # centred: [-1, 0, 1] and [-7/3, -1/3, 8/3]
    expected = (7 / 3 + 8 / 3) / (math.sqrt(2) * math.sqrt((49 + 1 + 64) / 9) + 1e-8)
    close(pearson_rows(a, b)[0], expected, tol=1e-12)
    close(pearson_rows(a, -a)[0], -1.0)
    # posteriors equal up to their relations: inter = 0 without the eps (with it, tau^2 * eps / norm product)
    z = rand64(4, 10, seed=12)
    assert abs(float(dist_inter_loss(z, z, 4.0, eps=0.0))) < 1e-12
    assert 0 < float(dist_inter_loss(z, z, 4.0)) < 1e-3


def test_dist_sends_no_gradient_to_the_teacher():
    from kdbench.methods.dist import dist_inter_loss, dist_intra_loss

    z_s = rand64(4, 10, seed=13).requires_grad_()
    z_t = rand64(4, 10, seed=14).requires_grad_()
    (dist_inter_loss(z_s, z_t) + dist_intra_loss(z_s, z_t)).backward()
    assert z_t.grad is None and z_s.grad.abs().sum() > 0


def test_dist_method_logs_inter_and_intra_weighted_separately(benchmark_pair):
    from kdbench.methods.dist import dist_inter_loss, dist_intra_loss

    method = create_method(method_options("dist", **{"weights.intra": 0.5}), benchmark_pair)
    assert count_parameters(method) == 0 and method.tau == 4.0
    z_s, z_t = rand64(4, 100, seed=15).float(), rand64(4, 100, seed=16, scale=3).float()
    total, terms = method.loss(make_batch(4, 100), {"logits": z_s}, {"logits": z_t}, 1)
    assert set(terms) == {"ce", "inter", "intra"}
    close(terms["inter"], float(dist_inter_loss(z_s.double(), z_t.double(), 4.0)), tol=1e-5)
    close(terms["intra"], float(dist_intra_loss(z_s.double(), z_t.double(), 4.0)), tol=1e-5)
    close(total, float(terms["ce"] + 2.0 * terms["inter"] + 0.5 * terms["intra"]), tol=1e-6)


def test_dist_refuses_bad_options_and_a_one_class_task():
    with pytest.raises(KDBenchError, match="tau"):
        create_method(method_options("dist", tau=0.0), make_pair("resnet14", "resnet8"))
    with pytest.raises(IncompatibleModels, match="dist"):
        create_method(method_options("dist"), make_pair("mlp_1200x2", "mlp_32", 1, (1, 8, 8)))


@pytest.mark.slow
@pytest.mark.parametrize("student", ["resnet8x4", "ShuffleV2"])
def test_dist_job_runs_from_resnet32x4(run_job, random_teacher_checkpoint, student):
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet32x4", f"student={student}", "method=dist",
                     f"teacher.checkpoint={random_teacher_checkpoint}")
    assert record["status"] == "completed" and record["extra_params"] == 0
    assert set(record["history"][0]["train"]) == {"loss", "ce", "inter", "intra"}
