"""Yim et al. 2017, "A Gift from Knowledge Distillation" (FSP): transfer the flow between consecutive feature maps.

Levels: the stem and every stage output (post-ReLU). For each consecutive pair (F_a, F_b) the larger map is
adaptive-average-pooled to the smaller, then G[c_a, c_b] = (1/HW) sum_hw F_a[c_a, hw] F_b[c_b, hw] (N x C_a x C_b).
Student and teacher must have the same channel width at every level (else IncompatibleModels before training).

Two stages (both protocols):
  1. 'fsp' stage: `stage_epochs` epochs of SGD at constant LR (the run's base LR) over the student's parameters,
     minimising the FSP loss alone (no CE).
  2. main training: CE only (weights.fsp = 0; the FSP term is still computed and logged).
protocol: reference  RD (methods.md §2.11): per-pair loss = mean over N*C_a*C_b of (G_s - G_t)^2, summed over pairs.
protocol: paper      the paper's eq. (2): per pair ||G_s - G_t||_F^2 summed over entries, averaged over samples,
                     pairs weighted equally (lambda_i = 1). The same stage/CE structure; differs by a factor C_a*C_b.
"""
from __future__ import annotations

from typing import Sequence

import torch

from kdbench.methods.common import feature_map_shapes, match_spatial
from kdbench.distill import Method, Stage, register_method
from kdbench.errors import KDBenchError

PROTOCOLS = ("reference", "paper")


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, C_a, C_b) FSP matrix of two maps: the larger pooled to the smaller, then the HW-averaged outer product."""
    a, b = match_spatial(a, b)
    h, w = a.shape[-2], a.shape[-1]
    return torch.bmm(a.flatten(2), b.flatten(2).transpose(1, 2)) / (h * w)


def fsp_loss(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor],
             reduction: str = "mean") -> torch.Tensor:
    """Sum over consecutive pairs of the FSP-matrix distance; teacher detached.

    reduction 'mean': mean over N*C_a*C_b of the squared difference (RD); 'frobenius': squared Frobenius norm per
    sample, averaged over samples (the paper)."""
    if len(student_maps) != len(teacher_maps) or len(student_maps) < 2:
        raise KDBenchError("fsp_loss needs the same number (>= 2) of student and teacher maps")
    total = 0.0
    for i in range(len(student_maps) - 1):
        g_s = fsp_matrix(student_maps[i], student_maps[i + 1])
        g_t = fsp_matrix(teacher_maps[i].detach(), teacher_maps[i + 1].detach())
        sq = (g_s - g_t).pow(2)
        if reduction == "mean":
            total = total + sq.mean()
        elif reduction == "frobenius":
            total = total + sq.flatten(1).sum(1).mean()
        else:
            raise KDBenchError(f"fsp_loss: reduction must be 'mean' or 'frobenius', got '{reduction}'")
    return total


@register_method("fsp")
class FSP(Method):
    paper = "Yim et al., A Gift from Knowledge Distillation (FSP), CVPR 2017"
    code = "HobbitLong/RepDistiller distiller_zoo/FSP.py"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.protocol = str(cfg.get("protocol", "reference"))
        if self.protocol not in PROTOCOLS:
            raise KDBenchError(f"fsp: method.protocol must be one of {PROTOCOLS}, got '{self.protocol}'")
        self.reduction = "mean" if self.protocol == "reference" else "frobenius"
        self.stage_epochs = int(cfg.get("stage_epochs", 30))
        stage_lr = cfg.get("stage_lr", None)
        self.stage_lr = float(pair.lr if stage_lr is None else stage_lr)
        if pair.teacher is None:
            raise pair.incompatible(self.method_name, "it needs a teacher")
        self.student_taps = ("stem", *pair.student.stage_names)
        self.teacher_taps = ("stem", *pair.teacher.stage_names)
        s_shapes, t_shapes = feature_map_shapes(pair, self.method_name, self.student_taps, self.teacher_taps)
        mismatched = [f"{ts} student {s} vs teacher {t}" for ts, s, t in zip(self.student_taps, s_shapes, t_shapes)
                      if s[0] != t[0]]
        if mismatched:
            raise pair.incompatible(self.method_name, "FSP matrices need equal channel widths at every level "
                                                      "(stem + stages), but: " + "; ".join(mismatched))

    def _fsp(self, student, teacher):
        return fsp_loss([student[k] for k in self.student_taps], [teacher[k] for k in self.teacher_taps], self.reduction)

    def stages(self, student, teacher):
        if self.stage_epochs <= 0:
            return []
        return [Stage(name="fsp", epochs=self.stage_epochs, lr=self.stage_lr, parameters=list(student.parameters()),
                      loss=lambda batch, s, t: self._fsp(s, t), student_taps=self.student_taps,
                      teacher_taps=self.teacher_taps)]

    def terms(self, batch, student, teacher):
        return {"fsp": self._fsp(student, teacher)}
