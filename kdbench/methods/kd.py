"""Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".

loss = w_ce * CE(z_s, y) + w_kd * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), KL averaged over the batch
("batchmean", as RepDistiller and mdistiller do). The T^2 factor keeps soft-target gradients on the scale
of the hard-target ones when T changes (paper, section 2). Benchmark default: T=4, w_ce=0.1, w_kd=0.9.

Option `logit_standardization` (default false): LSKD's KD+LS (Sun et al. CVPR 2024, logit-standardization-KD
`mdistiller/distillers/KD.py` `kd_loss` with `logit_stand`): the kd term becomes
    T^2 * batchmean KL(softmax(Z(z_t)/T) || softmax(Z(z_s)/T)),  Z = kdbench.methods.common.standardize_logits,
with CE on the raw logits. The LSKD repo's CIFAR-100 flags (--logit-stand --base-temp 2 --kd-weight 9) are
temperature 2, weights ce 0.1 (mdistiller's cfg default), kd 9; they are not the defaults here (set them in the run).
"""
from kdbench.distill import Method, register_method
from kdbench.losses import kd_loss  # noqa: F401  (the public home of the KD loss: kdbench.methods.kd.kd_loss)
from kdbench.methods.common import standardize_logits


def standardized_kd_loss(student_logits, teacher_logits, temperature: float):
    """kd_loss on Z-scored logits: T^2 * batchmean KL(softmax(Z(z_t)/T) || softmax(Z(z_s)/T)) (LSKD's KD+LS).
    The teacher side is detached."""
    return kd_loss(standardize_logits(student_logits), standardize_logits(teacher_logits.detach()), temperature)


@register_method("kd")
class KD(Method):
    """The `ce` term is the base class's; the `kd` term is the base class's Hinton term (weights.kd, temperature)
    unless `logit_standardization` is on, when terms() returns the standardised one instead."""
    paper = "Hinton, Vinyals & Dean, Distilling the Knowledge in a Neural Network, NIPS DL Workshop 2015"
    code = "HobbitLong/RepDistiller distiller_zoo/KD.py; megvii-research/mdistiller KD"

    teacher_taps = ("logits",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.logit_standardization = bool(cfg.get("logit_standardization", False))

    def terms(self, batch, student, teacher):
        if self.logit_standardization and "kd" in self.weights:
            return {"kd": standardized_kd_loss(student["logits"], teacher["logits"], self.kd_temperature)}
        return {}
