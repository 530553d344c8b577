"""Yang, Zeng, Li, Zhang, Yuan & Li, ICCV 2023, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified
Approach with Normalized Loss and Customized Soft Labels": NKD, normalized KD (yzd-v/cls_KD
mmcls/models/dis_losses/nkd.py `NKDLoss`). The teacher-free USKD of the same paper is kdbench.methods.uskd.

KD's loss splits into a target part and a non-target part; NKD keeps the first and renormalises the second over the
non-target classes, so its soft labels sum to 1 on both sides. With y the label, p = softmax(z) (T = 1) and
q = softmax over the K - 1 non-target logits (column y removed) at temperature T:

    nkd_target     = -(1/B) sum_b p_t[b, y_b] * log p_s[b, y_b]                 (teacher's target probability, T = 1)
    nkd_non_target = -T^2 (1/B) sum_b sum_{c != y_b} q_t[b, c](T) * log q_s[b, c](T)
    total = ce * CE + nkd_target * nkd_target + nkd_non_target * nkd_non_target      (teacher detached)

The code returns loss_t + gamma * loss_non in one term; kdbench logs the two terms with weights 1 and gamma. Both are
cross-entropies, not KLs: their values include the teacher's (constant) entropy, their gradients are KD's.
Defaults: the repo's only CIFAR-100 config (configs/distillers/cifar100/res34_distill_res18_cifar.py: T 3, gamma 3.5);
NKDLoss's own defaults are T 1, gamma 1.5 (its ImageNet setting). The student's CE (weight 1) is the head's own loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError


def gather_target(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """x[b, target[b]] for each row; shape (B,)."""
    return x.gather(1, target.view(-1, 1)).squeeze(1)


def drop_target(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """x without each row's target column: shape (B, K - 1), the other columns in their order."""
    keep = torch.ones_like(x, dtype=torch.bool).scatter_(1, target.view(-1, 1), False)
    return x[keep].view(x.shape[0], x.shape[1] - 1)


def nkd_target_loss(z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-(1/B) sum_b p_t[y] log p_s[y] at T = 1, p_t detached: the teacher's target probability as a soft label."""
    t_y = gather_target(F.softmax(z_t.detach(), dim=1), target)
    log_s_y = gather_target(F.log_softmax(z_s, dim=1), target)
    return -(t_y * log_s_y).mean()


def nkd_non_target_loss(z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """-T^2 (1/B) sum_b sum_{c != y} softmax(z_t^{-y}/T)_c log softmax(z_s^{-y}/T)_c (the target column removed)."""
    q_t = F.softmax(drop_target(z_t.detach(), target) / temperature, dim=1)
    log_q_s = F.log_softmax(drop_target(z_s, target) / temperature, dim=1)
    return -temperature**2 * (q_t * log_q_s).sum(dim=1).mean()


@register_method("nkd")
class NKD(Method):
    """Terms `nkd_target` and `nkd_non_target` (weight gamma) next to the base class's `ce`."""
    paper = "Yang et al., From Knowledge Distillation to Self-Knowledge Distillation (NKD), ICCV 2023"
    code = "yzd-v/cls_KD mmcls/models/dis_losses/nkd.py"

    teacher_taps = ("logits",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.temperature = float(cfg.temperature)
        if self.temperature <= 0:
            raise KDBenchError(f"nkd: method.temperature must be > 0, got {self.temperature}")
        if pair.num_classes < 3:
            raise pair.incompatible("nkd", f"a non-target distribution needs at least 3 classes, got {pair.num_classes}")

    def terms(self, batch, student, teacher):
        z_s, z_t, y = student["logits"], teacher["logits"], batch.targets
        return {"nkd_target": nkd_target_loss(z_s, z_t, y),
                "nkd_non_target": nkd_non_target_loss(z_s, z_t, y, self.temperature)}
