"""Bagherinezhad, Horton, Rastegari & Farhadi 2018, "Label Refinery: Improving ImageNet Classification through Label
Progression". Reference code: hessamb/label-refinery (`extensions/refinery_loss.py` RefineryLoss,
`extensions/model_refinery_wrapper.py` ModelRefineryWrapper, `train.py`).

A model is trained on the labels a trained model (the "refinery") gives each training crop: its softmax on that very
crop, the dataset label ignored at training time.
  refinery = (1/N) sum_n -sum_c softmax(z_t[n])_c * log softmax(z_s[n])_c        (T = 1; z_t detached)
a cross-entropy with soft targets, as RefineryLoss computes it (-bmm(refined_labels, log_softmax(output)), averaged
over the batch); it differs from KL(p_t || p_s) by the refinery's entropy, which has no gradient. Weights: refinery 1,
ce 0 (logged only: RefineryLoss ignores the target in training).

Generations. The paper's AlexNet^1 .. AlexNet^5: generation k + 1 is trained with generation k as its refinery. In
kdbench the refinery is the teacher, and a generation chain is the teacher pipeline's `teacher.distill` (as BAN's):
conf/experiment/label_refinery_cifar100.yaml. The refinery need not share the student's architecture ("AlexNet by
ResNet-50").

Refinery mode (`teacher_train_mode`). ModelRefineryWrapper holds the refinery as a submodule, so train.py's
model.train() puts it in training mode too: its BatchNorm normalises with the crop batch's statistics (and updates its
running statistics) and its dropout is active (AlexNet's classifier). kdbench follows the code (`teacher_train_mode:
true`: the teacher runs in train mode, gradients off, which also rules out a teacher-output cache); `false` is the
refinery in evaluation mode, as the paper describes the refined labels (a trained model's prediction).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdbench.distill import Method, register_method


def refinery_loss(student_logits: torch.Tensor, refinery_logits: torch.Tensor) -> torch.Tensor:
    """(1/N) sum_n -sum_c softmax(z_t[n])_c log softmax(z_s[n])_c; the refinery side is detached. Float32 or wider."""
    z_s = student_logits.float() if student_logits.dtype in (torch.float16, torch.bfloat16) else student_logits
    p_t = F.softmax(refinery_logits.detach().to(z_s.dtype), dim=1)
    return -(p_t * F.log_softmax(z_s, dim=1)).sum(1).mean()


@register_method("label_refinery")
class LabelRefinery(Method):
    paper = "Bagherinezhad et al., Label Refinery: Improving ImageNet Classification through Label Progression, arXiv 2018"
    code = "hessamb/label-refinery"
    teacher_taps = ("logits",)
    teacher_train_mode = True  # ModelRefineryWrapper: the refinery follows the wrapper into train mode

    def terms(self, batch, student, teacher):
        return {"refinery": refinery_loss(student["logits"], teacher["logits"])}

    def record_fields(self):
        return {"evaluated_head": "student", "refinery_mode": "train" if self.teacher_train_mode else "eval"}
