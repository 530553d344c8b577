"""Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".

loss = w_ce * CE(z_s, y) + w_kd * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), KL averaged over the batch
("batchmean", as RepDistiller and mdistiller do). The T^2 factor keeps soft-target gradients on the scale
of the hard-target ones when T changes (paper, section 2). Benchmark default: T=4, w_ce=0.1, w_kd=0.9.
"""
from kdbench.distill import Method, register_method
from kdbench.losses import kd_loss  # noqa: F401  (the public home of the KD loss: kdbench.methods.kd.kd_loss)


@register_method("kd")
class KD(Method):
    """The `ce` and `kd` terms are the base class's (weights.ce, weights.kd, temperature)."""

    teacher_taps = ("logits",)
