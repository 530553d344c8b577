"""KD loss against values worked out independently (explicit numpy sums)."""
import math

import numpy as np
import torch

from kdbench.methods.kd import kd_loss


def _kd_by_hand(zs, zt, T):
    total = 0.0
    for s_row, t_row in zip(zs, zt):
        ps = np.exp(s_row / T) / np.exp(s_row / T).sum()
        pt = np.exp(t_row / T) / np.exp(t_row / T).sum()
        total += sum(p * math.log(p / q) for p, q in zip(pt, ps))
    return T * T * total / len(zs)


def test_kd_loss_matches_hand_computation():
    zs = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    zt = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    got = kd_loss(torch.tensor(zs), torch.tensor(zt), temperature=4.0).item()
    assert abs(got - _kd_by_hand(zs, zt, 4.0)) < 1e-10


def test_kd_loss_two_class_closed_form():
    # p_t = (1/2, 1/2), p_s = softmax([ln 3, 0]) = (3/4, 1/4) at T=1: KL = 0.5 ln(2/3) + 0.5 ln(2)
    got = kd_loss(torch.tensor([[math.log(3.0), 0.0]]), torch.zeros(1, 2), temperature=1.0).item()
    assert abs(got - (0.5 * math.log(2 / 3) + 0.5 * math.log(2))) < 1e-7


def test_kd_loss_is_zero_for_equal_logits_and_teacher_gets_no_gradient():
    zs = torch.randn(4, 5, requires_grad=True)
    zt = zs.detach().clone().requires_grad_(True)
    loss = kd_loss(zs, zt, 4.0)
    assert abs(loss.item()) < 1e-6
    (loss + kd_loss(zs, zt * 2, 4.0)).backward()
    assert zt.grad is None and zs.grad is not None
