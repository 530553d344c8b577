"""Zhang, Lan, Dai, Zeng, Bai, Chang & Wei, ECCV 2020, "Prime-Aware Adaptive Distillation" (PAD), as torchdistill
implements it (`torchdistill/losses/mid_level.py` PADL2Loss, `torchdistill/models/wrapper.py` VarianceBranch4PAD;
methods-modern.md "ICKD, SRD, PAD, SSKD").

The student predicts a per-sample, per-dimension log-variance of its own embedding, and the L2 between the student's
and the teacher's pooled embeddings is weighted by that learned uncertainty:

  v = var_estimator(e_s) = BatchNorm1d(Linear(d_s -> d)(e_s))       (log sigma^2, d = the teacher's width)
  pad_l2 = mean_n mean_d [ (e_t - p(e_s))^2 / (eps + exp(v)) + v ],  eps = 1e-6
  p = identity when d_s == d_t (torchdistill's ResNet-34 -> ResNet-18 case, 512 -> 512), else Linear(d_s -> d_t)
      (kdbench's addition so that pairs of unequal width work; torchdistill has no such layer)

Samples the student cannot fit get a large predicted variance and a small weight (the "prime" samples, with small
variance, dominate); the + v term keeps the variance from growing without bound.
total = ce * CE + pad_l2 * PAD-L2 (torchdistill's rrpr2020 config: ce 1, pad_l2 1).

Code vs paper / protocol: torchdistill runs PAD as the second stage of a two-stage recipe (a student first trained
with CE + L2 on the embedding, then 30 epochs of CE + PAD-L2 at lr 0.002 on ImageNet). kdbench trains CE + PAD-L2
from a fresh student with the data set's recipe (one stage); the paper's CIFAR-100 settings are not in any released
code. The var_estimator is a trainable head (it joins the optimizer and is counted in extra_params; 66,304 parameters
for resnet32x4 -> resnet8x4: Linear 256*256 + 256 = 65,792, BN 2*256 = 512, 66,304 in all).
"""
from __future__ import annotations

import torch
from torch import nn

from kdbench.distill import Method, register_method


def pad_l2_loss(s: torch.Tensor, t: torch.Tensor, log_var: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """mean_n mean_d [(t - s)^2 / (eps + exp(log_var)) + log_var] on (N, D) tensors; the teacher side detached."""
    s, t, log_var = s.flatten(1), t.detach().flatten(1), log_var.flatten(1)
    per_sample = ((t - s).pow(2) / (eps + torch.exp(log_var)) + log_var).mean(dim=1)
    return per_sample.mean()


@register_method("pad")
class PAD(Method):
    paper = "Zhang et al., Prime-Aware Adaptive Distillation, ECCV 2020"
    code = "yoshitomo-matsubara/torchdistill PADL2Loss"
    student_taps = ("embedding",)
    teacher_taps = ("embedding",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        if pair.teacher is None or pair.teacher_shapes is None:
            raise pair.incompatible(self.method_name, "it needs a teacher")
        dims = {}
        for side, shapes, name in (("student", pair.student_shapes, pair.student_name),
                                   ("teacher", pair.teacher_shapes, pair.teacher_name)):
            shape = shapes.get("embedding")
            if shape is None or len(shape) != 1:
                raise pair.incompatible(self.method_name, f"it needs the {side}'s pooled embedding vector, and "
                                                          f"{name} has {shape}")
            dims[side] = int(shape[0])
        self.eps = float(cfg.get("eps", 1e-6))
        d_s, d_t = dims["student"], dims["teacher"]
        self.var_estimator = nn.Sequential(nn.Linear(d_s, d_t), nn.BatchNorm1d(d_t))
        self.projector = nn.Linear(d_s, d_t) if d_s != d_t else None

    def terms(self, batch, student, teacher):
        e_s = student["embedding"]
        log_var = self.var_estimator(e_s)
        s = self.projector(e_s) if self.projector is not None else e_s
        return {"pad_l2": pad_l2_loss(s, teacher["embedding"], log_var, self.eps)}

    def record_fields(self):
        return {"evaluated_head": "student", "trained_heads": ["var_estimator"] + (["projector"] if self.projector
                                                                                   is not None else [])}
