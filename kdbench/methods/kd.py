"""Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".

loss = w_ce * CE(z_s, y) + w_kd * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), KL averaged over the batch
("batchmean", as RepDistiller and mdistiller do). The T^2 factor keeps soft-target gradients on the scale
of the hard-target ones when T changes (paper, section 2). Benchmark default: T=4, w_ce=0.1, w_kd=0.9.
"""
import torch
import torch.nn.functional as F

from kdbench.distill import Method, register_method


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over samples of KL(p_t || p_s), with p = softmax(logits / T). Teacher side is detached."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


@register_method("kd")
class KD(Method):
    """The `ce` and `kd` terms are the base class's (weights.ce, weights.kd, temperature)."""

    teacher_taps = ("logits",)
