"""l2t_ww (Jang et al. ICML 2019): feature matching weighted per channel (what) and per pair and sample (where) by
meta-networks trained through look-ahead steps of the student."""
from __future__ import annotations

import contextlib

import pytest
import torch

from kdbench.distill import create_method
from kdbench.errors import IncompatibleModels
from tests.conftest import make_batch, make_pair
from tests.helpers import assert_no_teacher_grad, close, forward, method_options, rand64
from tests.methods.feature_helpers import one_epoch, teacher_checkpoints  # noqa: F401  (fixture)


def test_pair_loss_is_the_batch_mean_of_lambda_times_the_channel_weighted_spatial_mse():
    from kdbench.methods.l2t_ww import l2t_pair_loss

    src, tgt = rand64(2, 3, 2, 2, seed=1), rand64(2, 3, 2, 2, seed=2)
    w = torch.softmax(rand64(2, 3, seed=3), 1)
    lam = torch.tensor([[0.5], [2.0]], dtype=torch.float64)
    want = 0.0
    for n in range(2):
        per = sum(w[n, c].item() * sum((src[n, c, i, j].item() - tgt[n, c, i, j].item()) ** 2
                                       for i in range(2) for j in range(2)) / 4 for c in range(3))
        want += lam[n, 0].item() * per
    close(l2t_pair_loss(src, tgt, w, lam), want / 2)


def test_a_larger_source_map_is_resized_bilinearly_to_the_target():
    import torch.nn.functional as F
    from kdbench.methods.l2t_ww import l2t_pair_loss

    src, tgt = rand64(1, 2, 4, 4, seed=4), rand64(1, 2, 2, 2, seed=5)
    w, lam = torch.full((1, 2), 0.5, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    resized = F.interpolate(src, size=(2, 2), mode="bilinear")
    close(l2t_pair_loss(src, tgt, w, lam), float(((resized - tgt) ** 2).mean(dim=(2, 3)).mean()))


def test_the_meta_networks_start_uniform_over_channels_and_at_weight_one(benchmark_pair):
    m = create_method(method_options("l2t_ww"), benchmark_pair)
    assert len(m.pairs) == 9 and m.pairs[0] == ("stage1", "stage1")
    src = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        close(float(m.wnet[0](src)[0, 5]), 1 / 64)  # zero-initialised: uniform channel weights for any input
        close(float(m.lwnet[0](torch.zeros(2, 64, 8, 8))[1, 0]), 1.0)  # bias 1: relu6(1) on pooled zeros
    trained = {id(p) for p in m.trainable_parameters()}
    assert trained == {id(p) for p in m.regressors.parameters()}
    assert not trained & {id(p) for p in m.meta_parameters()}
    same = create_method(method_options("l2t_ww", pairs="same"), benchmark_pair)
    assert same.pairs == [("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")]


def test_no_gradient_reaches_the_teacher():
    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    m = create_method(method_options("l2t_ww"), pair)
    s, t = forward(pair, m, n=4, shape=(3, 16, 16))
    assert_no_teacher_grad(m.all_terms(make_batch(4, 10), s, t)["l2t_match"], *t.values())


def test_the_meta_step_moves_the_meta_networks_and_rolls_the_student_back():
    from kdbench.optim import StepPolicy

    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    m = create_method(method_options("l2t_ww"), pair)
    student = pair.student.train()
    policy = StepPolicy(torch.optim.SGD([*student.parameters(), *m.regressors.parameters()], lr=0.1, momentum=0.9,
                                        weight_decay=1e-4))
    batch = make_batch(6, 10)
    pair.teacher.eval()

    class Run:
        step = policy

    class Step:
        epoch, run = 1, Run

        def autocast(self):
            return contextlib.nullcontext()

        def update(self, stepper, total, terms):
            policy.step(total)

        def forward(self, x, taps):
            return student.forward_taps(x, taps)

        def teacher(self, b):
            with torch.no_grad():
                return pair.teacher.forward_taps(b.inputs, m.teacher_taps)

    before = {k: v.clone() for k, v in student.state_dict().items()}
    meta_before = [p.clone() for p in m.meta_parameters()]
    with torch.no_grad():
        t_out = Step().teacher(batch)
    m.meta_step(batch, t_out, Step())
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # parameters and BN statistics rolled back
    assert any(not torch.equal(a, b) for a, b in zip(meta_before, m.meta_parameters()))
    total, terms = m.train_step(batch, Step())  # the student's step then the meta step
    assert set(terms) == {"ce", "l2t_match"} and torch.isfinite(total)
    assert any(not torch.equal(before[k], student.state_dict()[k]) for k in before)
    # the look-ahead starts from the optimizer's momentum buffers and leaves them (and the student) as they were
    buffers = {id(p): policy.optimizer.state[p]["momentum_buffer"].clone() for p in student.parameters()}
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    m.meta_step(batch, t_out, Step())
    assert all(torch.equal(buffers[id(p)], policy.optimizer.state[p]["momentum_buffer"]) for p in student.parameters())
    assert all(torch.equal(weights[k], student.state_dict()[k]) for k in weights)
    assert all(torch.isfinite(p).all() for p in m.meta_parameters())


def test_l2t_ww_refuses_an_mlp_pair():
    with pytest.raises(IncompatibleModels, match="'l2t_ww'"):
        create_method(method_options("l2t_ww"), make_pair("mlp_1200x2", "mlp_32", 10, (1, 8, 8)))


@pytest.mark.slow
def test_l2t_ww_job_runs_resnet32x4_to_resnet8x4(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "l2t_ww", "resnet32x4", "resnet8x4")
    assert record["status"] == "completed" and len(record["l2t_pairs"]) == 9


@pytest.mark.slow
def test_l2t_ww_job_runs_the_cross_architecture_pair_vgg13_to_mobilenetv2(run_job, teacher_checkpoints):
    assert one_epoch(run_job, teacher_checkpoints, "l2t_ww", "vgg13", "MobileNetV2")["status"] == "completed"
