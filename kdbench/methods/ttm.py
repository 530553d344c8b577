"""Zheng & Yang, ICLR 2024, "Knowledge Distillation Based on Transformed Teacher Matching" (zkxufo/TTM,
distiller_zoo/ttm.py `TTM` and distiller_zoo/wttm.py `WTTM`). Two registered methods, `ttm` and `wttm`.

Temperature is dropped on the student side and kept, as a power transform, on the teacher side. With p_t = softmax(z_t)
and gamma = 1/T (`--ttm_l`):

    p~_t  = p_t^gamma / sum_c p_t^gamma          (= softmax(gamma * z_t): the teacher at temperature 1/gamma)
    KL_b  = KL(p~_t[b] || softmax(z_s[b]))       student at T = 1, no T^2 factor
    ttm   = (1/B) sum_b KL_b
    wttm  = (1/B) sum_b U_b * KL_b,  U_b = sum_c p_t[b, c]^gamma   (the un-normalised power sum: >= 1 for gamma < 1)
    total = ce * CE + ttm * ttm        (or + wttm * wttm)                  teacher detached, U too

The code computes p_t^gamma by raising softmax(z_t) to the power gamma; kdbench computes it in the log domain
(gamma * log_softmax(z_t)), which is the same number without underflow when a teacher probability is ~1e-38.
Flags: -r (CE weight, default 1), -b (weight of the distillation term), --ttm_l (gamma). The repo ships no per-pair
values; the README's example is vgg13 -> vgg8 TTM with gamma 0.1, -b 45, and its WTTM example (WTTM added to CRD) uses
gamma 0.2 with weight 4. The paper lists T and beta of every experiment in its appendix A.4 (not in the repo).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError


def transformed_teacher(z_t: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p~_t, log U): the power-transformed teacher distribution and the log of its normaliser sum_c p_t^gamma."""
    powered = gamma * F.log_softmax(z_t.detach(), dim=1)  # log p_t^gamma
    log_u = torch.logsumexp(powered, dim=1, keepdim=True)
    return powered - log_u, log_u.squeeze(1)


def _kl_per_sample(z_s, log_q):
    log_p_s = F.log_softmax(z_s, dim=1)
    return (log_q.exp() * (log_q - log_p_s)).sum(dim=1)


def ttm_loss(z_s: torch.Tensor, z_t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Batch mean of KL(p_t^gamma / sum p_t^gamma || softmax(z_s)); teacher detached, no temperature on the student."""
    log_q, _ = transformed_teacher(z_t, gamma)
    return _kl_per_sample(z_s, log_q).mean()


def wttm_loss(z_s: torch.Tensor, z_t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Batch mean of U * KL(p~_t || softmax(z_s)), U = sum_c p_t^gamma per sample (detached)."""
    log_q, log_u = transformed_teacher(z_t, gamma)
    return (log_u.exp() * _kl_per_sample(z_s, log_q)).mean()


class _TransformedTeacher(Method):
    teacher_taps = ("logits",)
    term = ""
    loss_fn = staticmethod(ttm_loss)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.gamma = float(cfg.gamma)
        if self.gamma <= 0:
            raise KDBenchError(f"{self.term}: method.gamma must be > 0, got {self.gamma}")

    def terms(self, batch, student, teacher):
        return {self.term: type(self).loss_fn(student["logits"], teacher["logits"], self.gamma)}


@register_method("ttm")
class TTM(_TransformedTeacher):
    """Term `ttm` next to the base class's `ce`."""
    paper = "Zheng & Yang, Knowledge Distillation Based on Transformed Teacher Matching (TTM), ICLR 2024"
    code = "zkxufo/TTM distiller_zoo/ttm.py"

    term = "ttm"
    loss_fn = staticmethod(ttm_loss)


@register_method("wttm")
class WTTM(_TransformedTeacher):
    """Term `wttm` (sample-weighted TTM) next to the base class's `ce`."""
    paper = "Zheng & Yang, Knowledge Distillation Based on Transformed Teacher Matching (WTTM), ICLR 2024"
    code = "zkxufo/TTM distiller_zoo/wttm.py"

    term = "wttm"
    loss_fn = staticmethod(wttm_loss)
