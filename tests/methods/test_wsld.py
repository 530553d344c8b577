"""wsld (weighted soft labels, Zhou et al. ICLR 2021): the soft-label cross-entropy at T, weighted per sample by
1 - exp(-CE_student / CE_teacher) (T = 1, no gradient through the weight)."""
from __future__ import annotations

import math

import pytest
import torch

from kdbench.distill import create_method
from kdbench.errors import KDBenchError
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair
from tests.helpers import close, method_options, np_ce, np_softmax, rand64


@pytest.mark.parametrize("temperature", [4.0, 2.0])
def test_wsld_matches_explicit_loops(temperature):
    from kdbench.methods.wsld import wsld_loss, wsld_sample_weights

    z_s, z_t = rand64(5, 6, seed=40, scale=2.0), rand64(5, 6, seed=41, scale=3.0)
    y = torch.tensor([1, 0, 5, 3, 3])
    total, weights = 0.0, []
    for b in range(5):
        zs, zt, t = z_s[b].numpy(), z_t[b].numpy(), int(y[b])
        w = 1 - math.exp(-max(np_ce(zs, t) / (np_ce(zt, t) + 1e-7), 0.0))
        p_t, p_s = np_softmax(zt / temperature), np_softmax(zs / temperature)
        total += w * -sum(p_t[c] * math.log(p_s[c]) for c in range(6))
        weights.append(w)
    close(wsld_loss(z_s, z_t, y, temperature), temperature**2 * total / 5)
    for got, want in zip(wsld_sample_weights(z_s, z_t, y).tolist(), weights):
        close(got, want)


def test_wsld_weight_by_hand_and_its_range():
    from kdbench.methods.wsld import wsld_sample_weights

    # student CE = teacher CE -> w = 1 - e^-1; a student far worse than the teacher -> w near 1
    z = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)
    close(wsld_sample_weights(z, z, torch.tensor([0]))[0], 1 - math.exp(-1), tol=1e-6)
    worse = wsld_sample_weights(torch.tensor([[-5.0, 5.0, 0.0]]), torch.tensor([[9.0, 0.0, 0.0]]), torch.tensor([0]))
    assert 0.999 < float(worse[0]) <= 1.0


def test_wsld_weight_carries_no_gradient_and_the_teacher_gets_none():
    from kdbench.methods.wsld import wsld_loss, wsld_sample_weights

    z_s = rand64(4, 10, seed=42).requires_grad_()
    z_t = rand64(4, 10, seed=43).requires_grad_()
    y = torch.tensor([0, 1, 2, 3])
    assert not wsld_sample_weights(z_s, z_t, y).requires_grad
    wsld_loss(z_s, z_t, y, 4.0).backward()
    assert z_t.grad is None and z_s.grad.abs().sum() > 0


def test_wsld_method_uses_the_data_sets_classes_and_adds_no_parameters(benchmark_pair):
    """The official code's one_hot(num_classes=1000) would fail on CIFAR-100; kdbench's weight works for any K."""
    method = create_method(method_options("wsld"), benchmark_pair)
    assert count_parameters(method) == 0 and method.temperature == 4.0
    z_s, z_t = rand64(3, 100, seed=44).float(), rand64(3, 100, seed=45).float()
    total, terms = method.loss(make_batch(3, 100, indices=[7, 99, 42]), {"logits": z_s}, {"logits": z_t}, 1)
    assert set(terms) == {"ce", "wsld"}
    close(total, float(terms["ce"] + 2.25 * terms["wsld"]), tol=1e-6)


def test_wsld_refuses_a_bad_temperature():
    with pytest.raises(KDBenchError, match="temperature"):
        create_method(method_options("wsld", temperature=0.0), make_pair("resnet14", "resnet8"))


@pytest.mark.slow
@pytest.mark.parametrize("student", ["resnet8x4", "ShuffleV2"])
def test_wsld_job_runs_from_resnet32x4(run_job, random_teacher_checkpoint, student):
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet32x4", f"student={student}", "method=wsld",
                     f"teacher.checkpoint={random_teacher_checkpoint}")
    assert record["status"] == "completed" and record["extra_params"] == 0
    assert set(record["history"][0]["train"]) == {"loss", "ce", "wsld"}
