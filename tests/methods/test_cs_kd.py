"""cs_kd (class-wise self-KD, alinlab/cs-kd): the KL of each anchor's prediction to a same-class partner's (detached)
prediction, on class-paired batches sampled by the method; no teacher, no extra parameters."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.distill import create_method, method_class
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair
from tests.helpers import close, method_options, np_ce, np_kl, np_softmax, rand64

SMALL_IMAGES = ["dataset.image_shape=[3,16,16]"]  # a fast job: 16x16 synthetic images, resnet8


def test_cs_kd_loss_is_t_squared_times_the_batch_mean_kl_from_the_partners_prediction():
    from kdbench.methods.cs_kd import cs_kd_loss

    B, K, T = 4, 6, 4.0
    za, zp = rand64(B, K, seed=1, scale=3.0), rand64(B, K, seed=2, scale=3.0)
    a, p = za.numpy(), zp.numpy()
    want = T**2 * sum(np_kl(np_softmax(p[i] / T), np_softmax(a[i] / T)) for i in range(B)) / B
    close(cs_kd_loss(za, zp, T), want)
    close(cs_kd_loss(za, zp, 1.0), sum(np_kl(np_softmax(p[i]), np_softmax(a[i])) for i in range(B)) / B)


def test_cs_kd_loss_sends_no_gradient_into_the_partner_prediction():
    from kdbench.methods.cs_kd import cs_kd_loss

    za, zp = rand64(3, 5, seed=3).requires_grad_(), rand64(3, 5, seed=4).requires_grad_()
    cs_kd_loss(za, zp, 4.0).backward()
    assert zp.grad is None and za.grad.abs().sum() > 0


def test_the_pair_sampler_visits_every_sample_once_as_anchor_with_a_same_class_partner_drawn_uniformly():
    from kdbench.methods.cs_kd import ClassPairSampler

    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 2, 1, 0, 3])
    sampler = ClassPairSampler(labels)
    g = torch.Generator().manual_seed(0)
    batches = list(sampler.epoch(5, g))
    assert [len(a) for a, _ in batches] == [5, 5, 2]
    anchors = torch.cat([a for a, _ in batches])
    assert sorted(anchors.tolist()) == list(range(len(labels)))
    for a, p in batches:
        assert torch.equal(labels[a], labels[p])
    # uniform over the class, the anchor itself included (random.choice over the class list): class 0 = {0, 2, 5, 10}
    counts = torch.bincount(sampler.partners(torch.zeros(40_000, dtype=torch.long), g), minlength=len(labels))
    assert set(torch.nonzero(counts).flatten().tolist()) == {0, 2, 5, 10}
    assert np.allclose(counts[[0, 2, 5, 10]].numpy() / 40_000, 0.25, atol=0.01)
    # a class of one sample pairs the sample with itself
    assert sampler.partners(torch.tensor([11, 11]), g).tolist() == [11, 11]


class _Loader:
    """Stands in for the data loader: take() returns the indices it was asked for, with the generator's next draw."""

    batch_size = 4

    def take(self, indices, generator):
        return indices.clone(), torch.rand(1, generator=generator).item()


def test_batches_are_anchors_then_their_partners_and_replay_from_the_epoch_seed():
    labels = torch.arange(20) % 3
    pair = make_pair(None, "resnet8", num_classes=3, n_train=20)
    pair.train_labels = labels
    method = create_method(method_options("cs_kd"), pair)
    first = list(method.batches(_Loader(), seed=123))
    again = list(method.batches(_Loader(), seed=123))
    other = list(method.batches(_Loader(), seed=124))
    assert len(first) == 5 and all(len(idx) == 8 for idx, _ in first)
    assert all(torch.equal(a, b) and x == y for (a, x), (b, y) in zip(first, again))
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(first, other))
    anchors = torch.cat([idx[:4] for idx, _ in first])
    assert sorted(anchors.tolist()) == list(range(20))
    for idx, _ in first:
        assert torch.equal(labels[idx[:4]], labels[idx[4:]])


class _Step:
    def __init__(self, model, log):
        self.model, self.log, self.epoch = model, log, 1

    def forward(self, inputs, taps):
        self.log.append((torch.is_grad_enabled(), inputs.shape[0]))
        return self.model.forward_taps(inputs, taps)


def test_a_step_forwards_anchors_with_gradient_and_partners_in_a_second_forward_without():
    from kdbench.methods.cs_kd import cs_kd_loss

    pair = make_pair(None, "resnet8")
    method = create_method(method_options("cs_kd"), pair)
    pair.student.train()
    anchors, partners = make_batch(4, 10, seed=1), make_batch(4, 10, seed=2)
    partners.targets = anchors.targets.clone()
    from kdbench.data.loader import Batch

    batch = Batch(torch.cat([anchors.inputs, partners.inputs]), torch.cat([anchors.targets, partners.targets]),
                  torch.cat([anchors.indices, partners.indices + 4]), torch.zeros(8, 2, dtype=torch.long),
                  torch.zeros(8, dtype=torch.bool))
    log = []
    total, terms = method.forward_loss(batch, _Step(pair.student, log))
    assert log == [(True, 4), (False, 4)]
    z_a = pair.student(anchors.inputs).detach().double().numpy()
    z_p = pair.student(partners.inputs).detach().double().numpy()
    y = anchors.targets.tolist()
    close(terms["ce"], sum(np_ce(z_a[i], y[i]) for i in range(4)) / 4, 1e-5)
    close(terms["cls"], float(cs_kd_loss(torch.tensor(z_a), torch.tensor(z_p), 4.0)), 1e-5)
    close(total, float((terms["ce"] + terms["cls"]).detach()), 1e-6)


def test_cs_kd_needs_no_teacher_and_adds_no_parameters_to_resnet8x4(benchmark_pair):
    assert method_class("cs_kd").needs_teacher is False
    assert count_parameters(create_method(method_options("cs_kd"), benchmark_pair)) == 0


def test_cs_kd_refuses_a_non_positive_temperature():
    from kdbench.errors import KDBenchError

    with pytest.raises(KDBenchError, match="temperature"):
        create_method(method_options("cs_kd", temperature=0.0), make_pair(None, "resnet8"))


def test_a_cs_kd_job_trains_on_class_paired_batches_without_a_teacher(run_job):
    rec = run_job(*TINY_SYNTHETIC, *SMALL_IMAGES, "teacher=resnet32x4", "student=resnet8", "method=cs_kd")
    assert rec["status"] == "completed" and rec["teacher"] is None and rec["extra_params"] == 0
    assert set(rec["history"][0]["train"]) == {"loss", "ce", "cls"}
    assert math.isfinite(rec["history"][0]["train"]["cls"]) and rec["evaluated_head"] == "student"


@pytest.mark.slow
@pytest.mark.parametrize("student", ["resnet8x4", "MobileNetV2"])
def test_a_cs_kd_job_trains_resnet8x4_and_another_architecture(run_job, student):
    rec = run_job(*TINY_SYNTHETIC, f"student={student}", "method=cs_kd")
    assert rec["status"] == "completed" and rec["student"] == student and rec["teacher"] is None
