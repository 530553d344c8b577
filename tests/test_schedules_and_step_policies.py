"""LR schedules (the CRD step rule, cosine, constant) and what the optimizer does with them in a real run: the LR of
each epoch is the one the optimizer steps with; DOT gets the CE term as its task loss and every other term as its
distillation loss; max_norm holds after every step; Adam and SGD take their hyper-parameters from the config.

Expected values are written out by hand (explicit loops and formulas, methods.md section 1.1 for the step rule).
"""
import math

import pytest
import torch

from kdbench.distill import Method
from kdbench.errors import KDBenchError
from kdbench.optim import DOT, StepPolicy, build_optimizer, lr_at
from tests.conftest import compose_config

DIGITS_STEPS_PER_EPOCH = math.ceil(1437 / 64)  # digits' training split at the default batch size


def _schedule(*overrides):
    return compose_config(list(overrides)).schedule


# ----------------------------------------------------------------------------- lr_at by hand


def test_step_schedule_is_the_crd_rule_at_every_epoch_of_the_recipe():
    sched = _schedule("schedule=step")
    assert (list(sched.milestones), sched.gamma) == ([150, 180, 210], 0.1)
    for epoch in range(1, 241):
        # methods.md 1.1: epochs 1-150 lr0, 151-180 0.1 lr0, 181-210 0.01 lr0, 211-240 0.001 lr0
        if epoch <= 150:
            want = 0.05
        elif epoch <= 180:
            want = 0.005
        elif epoch <= 210:
            want = 0.0005
        else:
            want = 0.00005
        assert lr_at(epoch, 0.05, sched, 240) == pytest.approx(want, rel=1e-12), epoch


def test_step_schedule_decays_after_each_milestone_epoch_with_its_gamma():
    sched = _schedule("schedule=step", "schedule.milestones=[2,4]", "schedule.gamma=0.5")
    assert [lr_at(e, 0.8, sched, 6) for e in range(1, 7)] == pytest.approx([0.8, 0.8, 0.4, 0.4, 0.2, 0.2])


def test_cosine_schedule_starts_at_the_base_lr_and_follows_the_half_cosine_per_epoch():
    sched = _schedule("schedule=cosine")
    assert sched.min_lr == 0.0
    # lr_e = min + (lr0 - min) * (1 + cos(pi * (e - 1) / E)) / 2, 1-indexed e, E = 4
    assert [lr_at(e, 0.1, sched, 4) for e in (1, 2, 3, 4)] == pytest.approx(
        [0.1, 0.05 * (1 + math.sqrt(0.5)), 0.05, 0.05 * (1 - math.sqrt(0.5))], rel=1e-12)
    floored = _schedule("schedule=cosine", "schedule.min_lr=0.02")
    assert [lr_at(e, 0.1, floored, 3) for e in (1, 2, 3)] == pytest.approx([0.1, 0.02 + 0.08 * 0.75, 0.02 + 0.08 * 0.25])
    lrs = [lr_at(e, 0.05, sched, 240) for e in range(1, 241)]
    assert lrs[0] == 0.05 and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 0


def test_constant_schedule_keeps_the_base_lr_and_an_unknown_schedule_is_an_error():
    assert {lr_at(e, 0.03, _schedule("schedule=constant"), 10) for e in range(1, 11)} == {0.03}
    bad = _schedule("schedule=step")
    bad.name = "linear"
    with pytest.raises(KDBenchError, match="step, cosine or constant"):
        lr_at(1, 0.1, bad, 10)


# ----------------------------------------------------------------------------- the LR the optimizer steps with


def _spy_steps(monkeypatch, check=None):
    """Wrap kdbench.optim.StepPolicy.step: record (lr in the optimizer, lr the update actually used) per step."""
    steps = []
    real = StepPolicy.step

    def spy(policy, total, task=None, share=1.0):
        optimizer = policy.optimizer
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if check is not None:
            check(params, len(steps))
        before = [p.detach().clone() for p in params]
        real(policy, total, task, share)
        # with momentum 0 and weight decay 0 an SGD step is p -= lr * grad: recover lr from the update
        num = sum(((b - p.detach()) * p.grad).sum() for b, p in zip(before, params) if p.grad is not None)
        den = sum((p.grad ** 2).sum() for p in params if p.grad is not None)
        steps.append((optimizer.param_groups[0]["lr"], (num / den).item()))

    monkeypatch.setattr(StepPolicy, "step", spy)
    return steps


PLAIN_SGD = ["method=vanilla", "student=mlp_32", "optim.lr=0.1", "optim.momentum=0", "optim.weight_decay=0",
             "trainer.epochs=3", "trainer.progress=false"]


@pytest.mark.parametrize("schedule,lrs", [
    (["schedule=step", "schedule.milestones=[1,2]"], [0.1, 0.01, 0.001]),
    (["schedule=cosine"], [0.1, 0.075, 0.025]),  # 0.05 * (1 + cos(pi * k / 3)), k = 0, 1, 2
])
def test_each_epochs_scheduled_lr_is_recorded_and_is_the_lr_the_optimizer_steps_with(run_job, monkeypatch, schedule, lrs):
    steps = _spy_steps(monkeypatch)
    rec = run_job(*PLAIN_SGD, *schedule)
    assert [h["lr"] for h in rec["history"]] == pytest.approx(lrs)
    assert len(steps) == 3 * DIGITS_STEPS_PER_EPOCH
    for k, (in_group, used) in enumerate(steps):
        want = lrs[k // DIGITS_STEPS_PER_EPOCH]  # set once per epoch, for all of its steps
        assert in_group == pytest.approx(want) and used == pytest.approx(want, rel=1e-3), k


# ----------------------------------------------------------------------------- DOT: which loss goes where


def test_dot_gets_the_weighted_ce_as_task_loss_and_every_other_term_as_distillation_loss(run_job, monkeypatch):
    losses, dot_calls = [], []
    real_loss, real_backward_step = Method.loss, DOT.backward_step

    def loss_spy(self, batch, student, teacher, epoch):
        total, terms = real_loss(self, batch, student, teacher, epoch)
        if self.training and torch.is_grad_enabled() and self.method_name == "kd":
            losses.append((total.item(), {k: v.item() for k, v in terms.items()}))
        return total, terms

    def dot_spy(self, distill_loss, task_loss, reduce=None):
        dot_calls.append((distill_loss.item(), task_loss.item()))
        return real_backward_step(self, distill_loss, task_loss, reduce)

    monkeypatch.setattr(Method, "loss", loss_spy)
    monkeypatch.setattr(DOT, "backward_step", dot_spy)
    rec = run_job("method=kd", "method.weights.ce=0.3", "method.weights.kd=0.7", "teacher=mlp_32", "student=mlp_32",
                  "optim=dot", "+teacher.recipe.optim.name=sgd", "trainer.epochs=1", "trainer.progress=false")
    assert rec["status"] == "completed"
    assert len(dot_calls) == len(losses) == DIGITS_STEPS_PER_EPOCH
    for (total, terms), (distill, task) in zip(losses, dot_calls):
        assert task == pytest.approx(0.3 * terms["ce"], rel=1e-5)
        assert distill == pytest.approx(0.7 * terms["kd"], rel=1e-4, abs=1e-6)
        assert distill + task == pytest.approx(total, rel=1e-5)


def test_dot_with_a_zero_ce_weight_is_rejected_with_a_clear_error(run_job):
    with pytest.raises(KDBenchError, match=r"method\.weights\.ce"):
        run_job("method=kd", "method.weights.ce=0", "teacher=mlp_32", "student=mlp_32", "optim=dot",
                "+teacher.recipe.optim.name=sgd", "trainer.epochs=1", "trainer.progress=false")


def test_dot_takes_momentum_delta_and_weight_decay_from_the_config():
    cfg = compose_config(["optim=dot", "optim.momentum=0.8", "optim.delta=0.05", "optim.weight_decay=0.001"]).optim
    group = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg).param_groups[0]
    assert (group["lr"], group["momentum"], group["delta"], group["weight_decay"]) == (0.05, 0.8, 0.05, 0.001)


# ----------------------------------------------------------------------------- max_norm, Adam, SGD


def test_max_norm_holds_after_every_step_of_training(run_job, monkeypatch):
    cap, seen = 0.5, {"at_cap": 0}

    def rows_within_cap(params, step):
        if step == 0:
            return  # the initial weights are not constrained yet
        for p in params:
            if p.dim() >= 2:
                norms = p.detach().flatten(1).norm(dim=1)
                assert norms.max() <= cap + 1e-5, f"step {step}: a row of norm {norms.max():.4f} > {cap}"
                seen["at_cap"] += int((norms > cap - 1e-4).sum())

    steps = _spy_steps(monkeypatch, check=rows_within_cap)
    run_job("method=vanilla", "student=mlp_32", "optim.lr=0.5", f"optim.max_norm={cap}", "trainer.epochs=2",
            "trainer.progress=false")
    assert len(steps) == 2 * DIGITS_STEPS_PER_EPOCH and seen["at_cap"] > 0  # the constraint was binding


def test_adam_steps_with_the_configured_betas():
    cfg = compose_config(["optim=adam", "optim.betas=[0.5,0.8]", "optim.lr=0.01"]).optim
    theta = torch.nn.Parameter(torch.tensor([1.0]))
    opt = build_optimizer([theta], cfg)
    assert opt.param_groups[0]["betas"] == (0.5, 0.8) and opt.param_groups[0]["weight_decay"] == 0.0
    for g in (1.0, 3.0):  # loss g * theta: gradient g
        opt.zero_grad()
        (g * theta).sum().backward()
        opt.step()
    b1, b2, eps = 0.5, 0.8, 1e-8
    m = b1 * (1 - b1) * 1.0 + (1 - b1) * 3.0
    v = b2 * (1 - b2) * 1.0 + (1 - b2) * 9.0
    step1 = 0.01 * 1.0  # first step: m_hat / sqrt(v_hat) = g / |g|
    step2 = 0.01 * (m / (1 - b1**2)) / (math.sqrt(v / (1 - b2**2)) + eps)
    assert theta.item() == pytest.approx(1.0 - step1 - step2, rel=1e-6)


def test_adam_defaults_are_torchs_betas_and_sgd_takes_every_field_from_the_config():
    adam = compose_config(["optim=adam"]).optim
    assert (adam.lr, list(adam.betas), adam.weight_decay) == (1e-3, [0.9, 0.999], 0.0)
    cfg = compose_config(["optim=sgd", "optim.lr=0.2", "optim.momentum=0.7", "optim.nesterov=true",
                          "optim.weight_decay=0.003"]).optim
    group = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg).param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.2, 0.7, True, 0.003)
    with pytest.raises(KDBenchError, match="sgd, adam or dot"):
        bad = compose_config(["optim=sgd"]).optim
        bad.name = "lamb"
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], bad)
