"""Zagoruyko & Komodakis 2017, "Paying More Attention to Attention" (AT), as in the authors' code / RD / MD.

For every stage output (post-ReLU) of student and teacher: pool the larger map to the smaller (spatial-mismatch
rule), a(f) = L2-normalise over H*W of the channel mean of f^p (p = 2), and take the mean over N*H*W of
(a_s - a_t)^2. at = sum over stages. total = ce * CE + at * AT with ce = 1, at = beta = 1000 (RD/MD).
This is the code's squared, averaged form, not the paper's eq. 2 (non-squared p-norm with beta/2).
"""
from __future__ import annotations

from typing import Sequence

import torch

from kdbench.methods.common import attention_map, feature_map_shapes, match_spatial
from kdbench.distill import Method, register_method


def at_layer_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean over N*H*W of (a(f_s) - a(f_t))^2 after pooling the larger map to the smaller; teacher detached."""
    f_s, f_t = match_spatial(f_s, f_t.detach())
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


def at_loss(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor], p: float = 2.0) -> torch.Tensor:
    """Sum over levels of at_layer_loss."""
    return sum(at_layer_loss(s, t, p) for s, t in zip(student_maps, teacher_maps, strict=True))


@register_method("at")
class AT(Method):
    paper = "Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR 2017"
    code = "HobbitLong/RepDistiller distiller_zoo/AT.py; megvii-research/mdistiller AT"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.p = float(cfg.get("p", 2.0))
        self.student_taps = tuple(pair.student.stage_names)
        self.teacher_taps = tuple(pair.teacher.stage_names) if pair.teacher is not None else ()
        feature_map_shapes(pair, self.method_name, self.student_taps, self.teacher_taps)

    def terms(self, batch, student, teacher):
        return {"at": at_loss([student[k] for k in self.student_taps], [teacher[k] for k in self.teacher_taps], self.p)}
