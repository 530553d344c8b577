"""The `l1_logits` method: mean absolute difference between the student's and the teacher's logits."""
import torch

from kdbench.distill import Method, register_method


def l1_logits_loss(z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """mean_{b,c} |z_s[b, c] - z_t[b, c]|, the teacher side detached (an example; no reference code)."""
    return (z_s - z_t.detach()).abs().mean()


@register_method("l1_logits")
class L1Logits(Method):
    """ce + l1 * L1(student logits, teacher logits)."""

    paper = "kdbench example plugin (no paper)"
    code = "tests/plugin_example in the kdbench repository"
    teacher_taps = ("logits",)

    def terms(self, batch, student, teacher):
        return {"l1": l1_logits_loss(student["logits"], teacher["logits"])}
