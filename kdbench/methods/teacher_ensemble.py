"""What the multi-teacher methods (kd_avg, ae_kd, meal) share: how several teachers' outputs reach Method.terms().

The core hands a `multi_teacher` method one TeacherOutputs per entry of the `teachers` config (step.teachers, the
first is step.teacher). Method.loss()/terms() take a single teacher-outputs dict, so a method that learns from all of
them passes the first teacher's outputs with every teacher's logits stacked under ENSEMBLE:

    teacher = {**outputs_of_teacher_1, ENSEMBLE: stack([z_1, ..., z_M])}     # (M, N, C)

A dict without ENSEMBLE (one teacher, as the method-wiring tests build it) is an ensemble of that one teacher, so
every loss reduces to its single-teacher form there (kd_avg and ae_kd to Hinton's KD).
"""
from __future__ import annotations

from typing import Sequence

import torch

from kdbench.distill import Method

ENSEMBLE = "ensemble_logits"  # the key of the stacked (M, N, C) teacher logits in a teacher-outputs dict


def ensemble_outputs(outputs: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The first teacher's outputs plus every teacher's logits stacked (M, N, C) under ENSEMBLE."""
    if not outputs:
        raise ValueError("an ensemble needs at least one teacher's outputs")
    return {**outputs[0], ENSEMBLE: torch.stack([o["logits"] for o in outputs])}


def ensemble_logits(teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """The teachers' logits (M, N, C), detached: the ENSEMBLE entry, or the single teacher's logits as M = 1."""
    stacked = teacher.get(ENSEMBLE)
    if stacked is None:
        stacked = teacher["logits"].unsqueeze(0)
    return stacked.detach()


class EnsembleMethod(Method):
    """A method that learns from every teacher of the `teachers` config at once: each step runs every teacher on the
    batch and hands terms() the ENSEMBLE dict. The evaluated network is the student itself."""

    multi_teacher = True
    teacher_taps = ("logits",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.n_teachers = max(len(pair.teachers), 1)

    def forward_loss(self, batch, step):
        teacher = ensemble_outputs([outputs(batch) for outputs in step.teachers]) if step.teachers else None
        student = step.forward(batch.inputs, self.student_taps)
        return self.loss(batch, student, teacher, step.epoch)

    def record_fields(self) -> dict:
        return {"evaluated_head": "student", "trained_networks": ["student"], "n_teachers": self.n_teachers}
