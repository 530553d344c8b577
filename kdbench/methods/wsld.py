"""Zhou, Song, Chen, Zhou, Wang, Yuan & Zhang, ICLR 2021, "Rethinking Soft Labels for Knowledge Distillation: A
Bias-Variance Tradeoff Perspective" (weighted soft labels, WSLD; bellymonster/Weighted-Soft-Label-Distillation
knowledge_distiller.py `WSLDistiller`, ImageNet; the CIFAR-100 setting is yzd-v/cls_KD mmcls/models/dis_losses/wsld.py
`WSLDLoss`, the same formula without the hard CE).

Each sample's soft-label loss is weighted by how much worse the student fits the label than the teacher does:

    soft_b = -sum_c softmax(z_t/T)_c * log softmax(z_s/T)_c              (a cross-entropy, not a KL)
    ce_s_b = CE(z_s[b], y_b), ce_t_b = CE(z_t[b], y_b)                   (T = 1, both logits detached)
    w_b    = 1 - exp(-max(ce_s_b / (ce_t_b + 1e-7), 0))
    wsld   = T^2 * (1/B) sum_b w_b * soft_b
    total  = ce * CE(z_s, y) + wsld * wsld                                 (teacher detached; w carries no gradient)

The official code hard-codes one_hot(num_classes=1000) (ImageNet); kdbench uses the data set's classes. Being a
cross-entropy, the term's value includes the (weighted) teacher entropy; its gradient is the weighted KD gradient.
Defaults: CIFAR-100, cls_KD's WSLDLoss: T 4, alpha 2.25; hard CE weight 1 (the official code: hard_loss + alpha *
soft_loss; its ImageNet setting is T 2, alpha 2.5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError


def wsld_sample_weights(z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """w = 1 - exp(-max(CE_s / (CE_t + eps), 0)) per sample, from the detached T = 1 logits; shape (B,)."""
    ce_s = F.cross_entropy(z_s.detach(), target, reduction="none")
    ce_t = F.cross_entropy(z_t.detach(), target, reduction="none")
    return 1.0 - torch.exp(-torch.clamp(ce_s / (ce_t + eps), min=0.0))


def wsld_loss(z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor, temperature: float,
              eps: float = 1e-7) -> torch.Tensor:
    """T^2 * (1/B) sum_b w_b * (-sum_c softmax(z_t/T) log softmax(z_s/T)); the teacher is detached."""
    p_t = F.softmax(z_t.detach() / temperature, dim=1)
    soft = -(p_t * F.log_softmax(z_s / temperature, dim=1)).sum(dim=1)
    return temperature**2 * (wsld_sample_weights(z_s, z_t, target, eps) * soft).mean()


@register_method("wsld")
class WSLD(Method):
    """Term `wsld` next to the base class's `ce`."""
    paper = "Zhou et al., Rethinking Soft Labels for Knowledge Distillation (WSLD), ICLR 2021"
    code = "bellymonster/Weighted-Soft-Label-Distillation knowledge_distiller.py"

    teacher_taps = ("logits",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.temperature = float(cfg.temperature)
        self.eps = float(cfg.eps)
        if self.temperature <= 0:
            raise KDBenchError(f"wsld: method.temperature must be > 0, got {self.temperature}")

    def terms(self, batch, student, teacher):
        return {"wsld": wsld_loss(student["logits"], teacher["logits"], batch.targets, self.temperature, self.eps)}
