"""USKD, the teacher-free ("universal self-KD") half of Yang et al., ICCV 2023, "From Knowledge Distillation to
Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels" (yzd-v/cls_KD
mmcls/models/dis_losses/uskd.py `USKDLoss`, called from mmcls/models/classifiers/distiller.py with `sd=True`).
NKD (with a teacher) is kdbench.methods.nkd. needs_teacher = False: it runs with no teacher in the config.

USKD makes its own soft labels. With s = softmax(z_s), y the label, f the globally average-pooled output of the
student's second-to-last stage (`student.neck(fea_s[-2])`) and a trainable linear head w = fc(f) (the only extra
parameters: C_mid x K + K):

    p~_y          = s_y^2 + 1 - mean_b(s_y^2)                                    (detached: a smoothed target label)
    uskd_target   = -(1/B) sum_b p~_y[b] * log s[b, y_b]
    uskd_weak     = -(1/B) sum_b sum_c (0.9 * onehot_y + 0.1 / K)_c * log softmax(w)[b, c]      (trains fc and f)
    scores        = softmax(w) / (1 - softmax(w)_y + 1e-6)  +  log s / (1 - log s_y + 1e-6)
    zipf[b, c]    = 1 / (1 + position of class c when row b's scores are sorted in descending order)
    n~            = zipf without column y, renormalised to sum 1 (detached)
    uskd_non_target = -(1/B) sum_b sum_{c != y} n~[b, c] * log softmax(z_s without column y)[b, c]
    total = ce * CE + alpha * uskd_target + beta * uskd_non_target + mu * uskd_weak

Code vs paper/description: in the code the student half of `scores` uses log-probabilities (the variable s_i was
re-bound to log_softmax just before the ranking), not probabilities; kdbench follows the code (`rank_student:
log_softmax`), `rank_student: softmax` ranks on probabilities instead. The code multiplies mu inside its weak term and
alpha / beta outside; kdbench logs the three terms unweighted and keeps alpha, beta, mu as their weights.
CIFAR-100 config (configs/distillers/cifar100/res18_sd_cifar.py, ResNet-18 with channel 256 = its stage 3 of 4):
alpha 0.1, beta 0.1, mu 0.1; the student's CE weight 1. On resnet8x4 the second-to-last stage is the 128-channel
stage2, so the weak head is Linear(128, 100): 12,900 extra parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError
from kdbench.methods.nkd import drop_target, gather_target

RANK_STUDENT = ("log_softmax", "softmax")


def pooled(f: torch.Tensor) -> torch.Tensor:
    """Global average pooling of a (B, C, H, W) map to (B, C); a (B, C) vector passes through."""
    return f.mean(dim=(2, 3)) if f.dim() == 4 else f.flatten(1)


def uskd_target_loss(z_s: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-(1/B) sum_b p~_y log s_y, with p~_y = s_y^2 + 1 - mean_b(s_y^2) detached (s = softmax(z_s))."""
    s_y = gather_target(F.softmax(z_s.detach(), dim=1), target)
    soft = s_y**2 + 1.0 - (s_y**2).mean()
    return -(soft * gather_target(F.log_softmax(z_s, dim=1), target)).mean()


def uskd_weak_loss(z_w: torch.Tensor, target: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Label-smoothed CE of the weak head's logits: target (1 - smoothing) * onehot + smoothing / K (the code's 0.9/0.1)."""
    k = z_w.shape[1]
    soft = torch.full_like(z_w, smoothing / k).scatter_add_(
        1, target.view(-1, 1), torch.full((len(target), 1), 1.0 - smoothing, dtype=z_w.dtype, device=z_w.device))
    return -(soft * F.log_softmax(z_w, dim=1)).sum(dim=1).mean()


def zipf_non_target_labels(z_s: torch.Tensor, z_w: torch.Tensor, target: torch.Tensor,
                           rank_student: str = "log_softmax", eps: float = 1e-6) -> torch.Tensor:
    """USKD's soft non-target labels (B, K - 1), detached: Zipf weights 1/rank of the combined weak + student scores,
    the target column dropped and each row renormalised to sum 1."""
    if rank_student not in RANK_STUDENT:
        raise KDBenchError(f"uskd: rank_student must be one of {RANK_STUDENT}, got {rank_student!r}")
    with torch.no_grad():
        w = F.softmax(z_w, dim=1)
        s = F.log_softmax(z_s, dim=1) if rank_student == "log_softmax" else F.softmax(z_s, dim=1)
        scores = (w / (1.0 - gather_target(w, target)[:, None] + eps)
                  + s / (1.0 - gather_target(s, target)[:, None] + eps))
        order = torch.sort(scores, dim=1, descending=True).indices
        position = torch.argsort(order, dim=1)  # position[b, c] = rank of class c in row b (0 = highest score)
        zipf = 1.0 / (position + 1).to(z_s.dtype)
        non = drop_target(zipf, target)
        return non / non.sum(dim=1, keepdim=True)


def uskd_non_target_loss(z_s: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-(1/B) sum_b sum_{c != y} labels[b, c] log softmax(z_s without column y)[b, c] (labels: (B, K - 1))."""
    return -(labels * F.log_softmax(drop_target(z_s, target), dim=1)).sum(dim=1).mean()


@register_method("uskd")
class USKD(Method):
    """Terms `uskd_target` (alpha), `uskd_non_target` (beta), `uskd_weak` (mu) next to the base class's `ce`; a
    trainable weak head `fc` on the pooled second-to-last stage of the student."""
    paper = "Yang et al., From Knowledge Distillation to Self-Knowledge Distillation (USKD), ICCV 2023"
    code = "yzd-v/cls_KD mmcls/models/dis_losses/uskd.py"

    needs_teacher = False

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.smoothing = float(cfg.smoothing)
        self.rank_student = str(cfg.rank_student)
        if self.rank_student not in RANK_STUDENT:
            raise KDBenchError(f"uskd: method.rank_student must be one of {RANK_STUDENT}, got {self.rank_student!r}")
        stages = tuple(pair.student.stage_names)
        if len(stages) < 2:
            raise pair.incompatible("uskd", f"the weak head sits on the student's second-to-last stage, but "
                                            f"{pair.student_name} has {len(stages)} stage(s) {list(stages)}")
        if pair.num_classes < 3:
            raise pair.incompatible("uskd", f"non-target labels need at least 3 classes, got {pair.num_classes}")
        self.mid_tap = stages[-2]
        self.student_taps = (self.mid_tap,)
        channels = pair.student_shapes[self.mid_tap][0]
        self.fc = nn.Linear(channels, pair.num_classes)

    def weak_logits(self, student) -> torch.Tensor:
        return self.fc(pooled(student[self.mid_tap]))

    def terms(self, batch, student, teacher):
        z_s, y = student["logits"], batch.targets
        z_w = self.weak_logits(student)
        labels = zipf_non_target_labels(z_s, z_w, y, self.rank_student)
        return {"uskd_target": uskd_target_loss(z_s, y),
                "uskd_non_target": uskd_non_target_loss(z_s, labels, y),
                "uskd_weak": uskd_weak_loss(z_w, y, self.smoothing)}
