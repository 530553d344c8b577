"""Miles & Mikolajczyk 2024, "Understanding the Role of the Projector in Knowledge Distillation" (AAAI; the authors'
roymiles/Simple-Recipe-Distillation `imagenet/torchdistill/losses/single.py` OurDistillationLoss and its config
`configs/ilsvrc2012/ours/res3418.yaml`; torchdistill `losses/mid_level.py` SRDLoss + `models/wrapper.py`
SRDModelWrapper).

Features: the pooled embeddings e_s (C_s), e_t (C_t) (the reference averages layer4 over H, W).
  projector: p = Linear(C_s -> C_t) (with bias; always applied, also when C_s = C_t; 65,792 parameters for
             resnet32x4 -> resnet8x4)
  bn(x) = (x - mean_N x) / sqrt(var_N x + eps): BatchNorm1d(affine=False, eps=1e-4) in training mode, i.e. batch
          statistics with the biased variance, applied to p(e_s) and to e_t alike
  srd = log( sum_{n,d} |bn(p(e_s)) - bn(e_t)|^exponent )      exponent 4 (the log of a SUM: it shifts with log(N d))
The reference returns 2 * srd + KL(T = 1, batchmean) on top of CE: here `srd` has weight 2 and the logit part is the
base class's `kd` term at temperature 1 (T^2 = 1), weight 1. Defaults: ce 1, srd 2, kd 1, T 1, exponent 4, eps 1e-4.
The authors released ImageNet code only; the paper's CIFAR-100 settings are not in it, so these are the ImageNet
settings. torchdistill's port puts the two BatchNorm1d layers in the student and teacher wrappers (the teacher's
then runs in whatever mode torchdistill leaves the teacher in); the authors' loss module holds both and normalises
each side by its batch statistics, which is what srd_loss does.
"""
from __future__ import annotations

import torch
from torch import nn

from kdbench.distill import Method, register_method


def batch_standardize(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(x - mean over the batch) / sqrt(biased batch variance + eps), per feature (BatchNorm1d, train mode, no affine)."""
    mean = x.mean(0, keepdim=True)
    var = (x - mean).pow(2).mean(0, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def srd_loss(projected_s: torch.Tensor, e_t: torch.Tensor, exponent: float = 4.0, eps: float = 1e-4) -> torch.Tensor:
    """log(sum |bn(projected_s) - bn(e_t)|^exponent) with bn = batch_standardize(., eps); teacher detached."""
    diff = batch_standardize(projected_s, eps) - batch_standardize(e_t.detach(), eps)
    return torch.log(diff.abs().pow(exponent).sum())


@register_method("srd")
class SRD(Method):
    paper = "Miles & Mikolajczyk, Understanding the Role of the Projector in Knowledge Distillation, AAAI 2024"
    code = "roymiles/Simple-Recipe-Distillation torchdistill/losses/single.py"
    student_taps = ("embedding",)
    teacher_taps = ("embedding",)  # the logits (for `kd`) come with every teacher output

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        if pair.teacher is None:
            raise pair.incompatible(self.method_name, "it needs a teacher")
        dims = {}
        for side, shapes, model in (("student", pair.student_shapes, pair.student_name),
                                    ("teacher", pair.teacher_shapes, pair.teacher_name)):
            shape = shapes.get("embedding")
            if shape is None or len(shape) != 1:
                raise pair.incompatible(self.method_name, f"it needs the {side}'s pooled embedding vector, and "
                                                          f"{model} has {shape}")
            dims[side] = int(shape[0])
        self.exponent = float(cfg.get("exponent", 4.0))
        self.eps = float(cfg.get("bn_eps", 1e-4))
        self.projector = nn.Linear(dims["student"], dims["teacher"])

    def terms(self, batch, student, teacher):
        return {"srd": srd_loss(self.projector(student["embedding"]), teacher["embedding"], self.exponent,
                                self.eps)}
