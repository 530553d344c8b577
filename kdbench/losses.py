"""The two loss terms every method may have, as plain functions of tensors: the base Method adds `ce` and, when
`method.weights.kd` is set, Hinton's `kd` (kdbench.distill). Kept apart from the plugins so the interface needs none
of them; `from kdbench.methods.kd import kd_loss` is the documented import.
"""
import torch
import torch.nn.functional as F


def cross_entropy(student: dict[str, torch.Tensor], batch) -> torch.Tensor:
    """Mean cross-entropy of the student's logits against the batch's labels."""
    return F.cross_entropy(student["logits"], batch.targets)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over samples of KL(p_t || p_s), with p = softmax(logits / T). Teacher side is detached."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2
