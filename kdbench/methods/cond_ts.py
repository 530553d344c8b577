"""Meng et al. 2019, "Conditional Teacher-Student Learning" (ICASSP): the student learns from the teacher only
where the teacher is right.

Per sample i, with teacher top-1 prediction t_i and label y_i (an exclusive switch, not an interpolation):
  t_i == y_i  ->  soft loss: -sum_k p_t(k) log p_s(k), p = softmax(z / T)   (the paper: T = 1)
  t_i != y_i  ->  hard loss: -log p_s(y_i), the ordinary CE on the unscaled student logits
cts = mean over the batch of the per-sample loss. With T != 1 the soft branch is multiplied by T^2 (as in KD) so
its gradients stay on the hard branch's scale. soft_loss: kl subtracts the teacher's entropy from the soft branch
(same gradients, zero at a perfect match). total = ce * CE + cts * CTS; the paper's recipe is ce = 0, cts = 1.
"""
import torch
import torch.nn.functional as F

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError

SOFT_LOSSES = ("ce", "kl")


def conditional_ts_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                        temperature: float = 1.0, soft_loss: str = "ce") -> torch.Tensor:
    """Mean over samples of: soft-target loss where the teacher's top-1 equals the label, else CE to the label.

    The teacher side is detached. Returns a scalar."""
    if soft_loss not in SOFT_LOSSES:
        raise KDBenchError(f"cond_ts: soft_loss must be one of {SOFT_LOSSES}, got '{soft_loss}'")
    teacher_logits = teacher_logits.detach()
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    p_t = log_p_t.exp()
    soft = -(p_t * log_p_s).sum(1)
    if soft_loss == "kl":
        soft = soft + (p_t * log_p_t).sum(1)
    soft = soft * temperature**2
    hard = F.cross_entropy(student_logits, targets, reduction="none")
    teacher_right = teacher_logits.argmax(1) == targets
    return torch.where(teacher_right, soft, hard).mean()


@register_method("cond_ts")
class ConditionalTS(Method):
    paper = "Meng et al., Conditional Teacher-Student Learning, ICASSP 2019"
    code = "none released; from the paper"
    teacher_taps = ("logits",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.temperature = float(cfg.get("temperature", 1.0))
        self.soft_loss = str(cfg.get("soft_loss", "ce"))
        if self.soft_loss not in SOFT_LOSSES:
            raise KDBenchError(f"cond_ts: method.soft_loss must be one of {SOFT_LOSSES}, got '{self.soft_loss}'")
        if pair.teacher_shapes is not None and pair.teacher_shapes["logits"] != pair.student_shapes["logits"]:
            raise pair.incompatible(self.method_name, f"logit shapes differ: student {pair.student_shapes['logits']}, "
                                                      f"teacher {pair.teacher_shapes['logits']}")

    def terms(self, batch, student, teacher):
        return {"cts": conditional_ts_loss(student["logits"], teacher["logits"], batch.targets, self.temperature,
                                           self.soft_loss)}
