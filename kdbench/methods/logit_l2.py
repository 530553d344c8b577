"""Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?": regress the student's logits on the teacher's.

The paper trains the mimic net on L = 1/(2N) * sum_i ||z_s,i - z_t,i||^2 (squared error summed over the logits,
averaged over samples), with no hard labels. Here:
  reduction: mean   -> mean over N*C of (z_s - z_t)^2 (torch's MSE; the paper's loss divided by C/2)
  reduction: paper  -> 1/2 * sum over classes, mean over samples (the paper's equation)
The factor between the two is a constant, absorbed by the weight. total = ce * CE + l2 * L2; the paper's recipe
is ce = 0 (logits only); ce > 0 mixes in the hard labels.
"""
import torch

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError

REDUCTIONS = ("mean", "paper")


def logit_l2_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Squared error between logits; the teacher side is detached. reduction: 'mean' (over N*C) or 'paper' (1/2 sum_C, mean_N)."""
    sq = (student_logits - teacher_logits.detach()).pow(2)
    if reduction == "mean":
        return sq.mean()
    if reduction == "paper":
        return 0.5 * sq.sum(1).mean()
    raise KDBenchError(f"logit_l2: reduction must be one of {REDUCTIONS}, got '{reduction}'")


@register_method("logit_l2")
class LogitL2(Method):
    paper = "Ba & Caruana, Do Deep Nets Really Need to be Deep?, NIPS 2014"
    code = "none released; from the paper"
    teacher_taps = ("logits",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.reduction = str(cfg.get("reduction", "mean"))
        if self.reduction not in REDUCTIONS:
            raise KDBenchError(f"logit_l2: method.reduction must be one of {REDUCTIONS}, got '{self.reduction}'")
        if pair.teacher_shapes is not None and pair.teacher_shapes["logits"] != pair.student_shapes["logits"]:
            raise pair.incompatible(self.method_name, f"logit shapes differ: student {pair.student_shapes['logits']}, "
                                                      f"teacher {pair.teacher_shapes['logits']}")

    def terms(self, batch, student, teacher):
        return {"l2": logit_l2_loss(student["logits"], teacher["logits"], self.reduction)}
