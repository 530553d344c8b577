"""DOT against its update rule worked out by hand for one parameter over two steps."""
from pathlib import Path

import pytest
import torch

from kdbench.optim import DOT


def test_dot_two_steps_by_hand():
    theta = torch.nn.Parameter(torch.tensor([1.0]))
    opt = DOT([theta], lr=0.1, momentum=0.9, delta=0.075, weight_decay=0.01)
    # loss_kd = 2*theta (gradient 2), loss_ce = 3*theta^2 (gradient 6*theta)
    opt.backward_step(2 * theta.sum(), 3 * (theta**2).sum())
    # step 1: task buf = 6*1 + 0.01*1 = 6.01 -> theta = 1 - 0.601 = 0.399; kd buf = 2 -> theta = 0.399 - 0.2 = 0.199
    assert theta.item() == pytest.approx(0.199)
    opt.zero_grad()
    opt.backward_step(2 * theta.sum(), 3 * (theta**2).sum())
    # step 2: g = 6*0.199 = 1.194; d = 1.194 + 0.00199; task buf = 0.825*6.01 + d = 6.15624 -> theta = 0.199 - 0.615624
    # kd buf = 0.975*2 + 2 = 3.95 -> theta -= 0.395
    task_buf = 0.825 * 6.01 + 1.194 + 0.00199
    assert theta.item() == pytest.approx(0.199 - 0.1 * task_buf - 0.395, abs=1e-6)


def test_dot_parameter_with_only_distillation_gradient_uses_plain_momentum_and_decay():
    head = torch.nn.Parameter(torch.tensor([1.0]))
    other = torch.nn.Parameter(torch.tensor([0.0]))
    opt = DOT([head, other], lr=0.1, momentum=0.9, delta=0.075, weight_decay=0.5)
    for _ in range(2):
        opt.zero_grad()
        opt.backward_step(4 * head.sum(), 1 * other.sum())
    # head: step 1 buf = 4 -> 0.6; step 2 buf = 0.9*4 + 4 + 0.5*0.6 = 7.9 -> 0.6 - 0.79
    assert head.item() == pytest.approx(0.6 - 0.79)


def test_kd_with_dot_trains_end_to_end(run_job):
    rec = run_job("trainer.epochs=2", "trainer.progress=false", "teacher=mlp_32", "method=kd", "optim=dot")
    assert rec["status"] == "completed" and rec["last_top1"] > 50


def test_max_norm_rescales_only_rows_over_the_cap():
    from kdbench.optim import apply_max_norm

    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.6, 0.8]]))  # row norms 5 and 1
    bias = torch.nn.Parameter(torch.tensor([10.0, -10.0]))
    apply_max_norm(torch.optim.SGD([weight, bias], lr=0.1), max_norm=2.0)
    assert torch.allclose(weight, torch.tensor([[1.2, 1.6], [0.6, 0.8]]))  # 5 -> 2 (x0.4); 1 stays
    assert torch.equal(bias, torch.tensor([10.0, -10.0]))  # biases are not constrained


def test_max_norm_holds_after_training(run_job):
    rec = run_job("method=vanilla", "student=mlp_32", "optim.lr=0.5", "optim.max_norm=0.5", "trainer.epochs=1",
                  "trainer.progress=false")
    from kdbench.io import load_torch

    state = load_torch(Path(rec["config"]["paths"]["root"]) / "job" / "checkpoint.pt", "checkpoint")["student"]
    for name, value in state.items():
        if value.dim() >= 2:
            assert value.flatten(1).norm(dim=1).max() <= 0.5 + 1e-5, name
