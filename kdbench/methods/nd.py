"""Wang et al. 2023, "Improving Knowledge Distillation via Regularizing Feature Norm and Direction" (ICCV; KD++,
DKD++, ReviewKD++; WangYZ1608/Knowledge-Distillation-via-ND `CIFAR/utils.py` DirectNormLoss, `CIFAR/train_cifar_kd.py`,
`train_cifar_dkd.py`, `ReviewKD++/train_reviewkd.py`, `emb_fea_distribution.py`, `Models/embtrans_cifar.py`).

One loss, `nd`, added by one mixin (NDMixin) to an existing method: configs kd_nd, dkd_nd, reviewkd_nd register
`kd_nd` = NDMixin + KD, `dkd_nd` = NDMixin + DKD, `reviewkd_nd` = NDMixin + ReviewKD; the parent's terms are computed by
the parent's own code. Another method gets ND the same way: `class XND(NDMixin, X)` registered with a config that adds
`weights.nd` (and warmed_terms below).

  c_y    the teacher's class centre: the mean teacher embedding of the training images of class y. The reference reads
         them from a JSON that emb_fea_distribution.py writes from ONE pass of the teacher (eval mode) over the training
         set with the training augmentation (crop + flip). Here the pre-training stage `nd_centres` makes that pass
         (`stage_epochs` passes; no parameter is trained; the stage's logged loss is 0) and keeps the sums in buffers
         (checkpointed). Without that stage (centres: online, or Method.loss called directly) the centres are the running
         means of the teacher embeddings of the batches seen so far, this batch included.
  s_n    the student embedding; when its width differs from the teacher's, the reference's EmbTrans maps it first:
         BatchNorm1d(C_s) -> Dropout(0.5) -> Linear(C_s -> C_t) (BN weight 1, bias 0; Linear bias 0), a trainable head
         used for ND only (the reference applies it to wrn_40_1, MobileNetV2, ShuffleV1/V2 students, i.e. exactly the
         pairs whose widths differ)
  nd = (1/N) sum_n [ 1 - <s_n, c_{y_n} / ||c_{y_n}||> / max(||s_n||, ||t_n||) ]      (t_n the teacher embedding; the
         teacher side and the centres are detached)
The parent's distillation terms are warmed up by min(max(epoch - warmup_offset, 0) / warmup_epochs, 1): the reference
loops count epochs from 0, so the first epoch has weight 0 (warmup_offset 1; kdbench's dkd/reviewkd count from 1, so
offset 0 reproduces them). KD++ warms up its KD term the same way (plain kd has no warm-up). ND itself is never warmed.
Per-pair weights (the reference's train_cifar.sh / train_reviewkd.sh) are looked up in each config's table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Stage, register_method
from kdbench.errors import KDBenchError
from kdbench.methods.common import warmup_factor
from kdbench.methods.dist import DIST
from kdbench.methods.dkd import DKD
from kdbench.methods.kd import KD
from kdbench.methods.reviewkd import ReviewKD

CENTRE_SOURCES = ("train_pass", "online")


def nd_loss(s_emb: torch.Tensor, t_emb: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(1/N) sum_n [1 - <s_n, c_y / ||c_y||> / max(||s_n||, ||t_n||)], c = centres[labels]; teacher and centres detached."""
    c = centres.detach()[labels]
    direction = c / c.norm(dim=1, keepdim=True)
    scale = torch.maximum(s_emb.norm(dim=1), t_emb.detach().norm(dim=1))
    return (1.0 - (s_emb * direction).sum(1) / scale).mean()


class EmbTrans(nn.Sequential):
    """The reference's student-side width adapter: BatchNorm1d(C_s) -> Dropout(0.5) -> Linear(C_s -> C_t), bias 0."""

    def __init__(self, c_s: int, c_t: int, dropout: float = 0.5):
        super().__init__(nn.BatchNorm1d(c_s), nn.Dropout(dropout), nn.Linear(c_s, c_t))
        nn.init.zeros_(self[2].bias)


class NDMixin:
    """Adds the `nd` term, the `embedding` taps, the class-centre buffers and the `nd_centres` stage to a Method.
    Subclasses set `warmed_terms`: the parent terms the reference warms up."""

    warmed_terms: tuple[str, ...] = ()

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        name = self.method_name
        if pair.teacher is None:
            raise pair.incompatible(name, "it needs a teacher")
        dims = {}
        for side, shapes, model in (("student", pair.student_shapes, pair.student_name),
                                    ("teacher", pair.teacher_shapes, pair.teacher_name)):
            shape = shapes.get("embedding")
            if shape is None or len(shape) != 1:
                raise pair.incompatible(name, f"ND needs the {side}'s pooled embedding vector, and {model} has {shape}")
            dims[side] = int(shape[0])
        self.student_taps = tuple(dict.fromkeys((*self.student_taps, "embedding")))
        self.teacher_taps = tuple(dict.fromkeys((*self.teacher_taps, "embedding")))
        self.emb_trans = EmbTrans(dims["student"], dims["teacher"]) if dims["student"] != dims["teacher"] else None
        self.centre_source = str(cfg.get("centres", "train_pass"))
        if self.centre_source not in CENTRE_SOURCES:
            raise KDBenchError(f"{name}: centres must be one of {CENTRE_SOURCES}, got '{self.centre_source}'")
        self.stage_epochs = int(cfg.get("stage_epochs", 1))
        self.stage_lr = 0.0  # nothing is trained in the centre pass
        self.warmup_epochs = float(cfg.get("warmup_epochs", 20))
        self.warmup_offset = int(cfg.get("warmup_offset", 1))
        self.register_buffer("centre_sum", torch.zeros(pair.num_classes, dims["teacher"]))
        self.register_buffer("centre_count", torch.zeros(pair.num_classes))
        self.register_buffer("centres_fixed", torch.zeros((), dtype=torch.bool))  # set by the centre pass
        self._restart_pass = False
        self._fixed = False  # mirrors centres_fixed once it is True (saves a device sync per step)

    # -- class centres

    @property
    def centres(self) -> torch.Tensor:
        return self.centre_sum / self.centre_count.clamp_min(1).unsqueeze(1)

    @torch.no_grad()
    def accumulate(self, t_emb: torch.Tensor, labels: torch.Tensor) -> None:
        self.centre_sum.index_add_(0, labels, t_emb.detach().to(self.centre_sum.dtype))
        self.centre_count.index_add_(0, labels, torch.ones_like(labels, dtype=self.centre_count.dtype))

    def _centre_pass(self, dummy: torch.Tensor):
        def loss(batch, student, teacher):
            if self._restart_pass:  # the stage (re)starts: forget any earlier sums
                self.centre_sum.zero_()
                self.centre_count.zero_()
                self.centres_fixed.fill_(True)
                self._restart_pass = False
            self.accumulate(teacher["embedding"], batch.targets)
            return (dummy * 0.0).sum()
        return loss

    def stages(self, student, teacher):
        stages = list(super().stages(student, teacher))
        if self.centre_source != "train_pass" or self.stage_epochs <= 0:
            return stages
        self._restart_pass = True
        dummy = torch.zeros((), device=self.centre_sum.device, requires_grad=True)  # SGD needs a parameter
        return [Stage("nd_centres", self.stage_epochs, self.stage_lr, [dummy], self._centre_pass(dummy),
                      student_taps=(), teacher_taps=("embedding",), uses_student=False), *stages]

    # -- terms

    def student_nd_embedding(self, student) -> torch.Tensor:
        s = student["embedding"]
        return self.emb_trans(s) if self.emb_trans is not None else s

    def terms(self, batch, student, teacher):
        out = dict(super().terms(batch, student, teacher))
        if not self._fixed:
            self._fixed = self.centre_source == "train_pass" and bool(self.centres_fixed)
        if not self._fixed:
            self.accumulate(teacher["embedding"], batch.targets)
        out["nd"] = nd_loss(self.student_nd_embedding(student), teacher["embedding"], self.centres, batch.targets)
        return out

    def term_weights(self, epoch):
        ramp = warmup_factor(max(epoch - self.warmup_offset, 0), self.warmup_epochs) if self.warmup_epochs > 0 else 1.0
        return {k: (v * ramp if k in self.warmed_terms else v) for k, v in self.weights.items()}


@register_method("kd_nd")
class KDND(NDMixin, KD):
    """KD++: ce + warm-up * kd + nd."""
    paper = "Wang et al., Improving Knowledge Distillation via Regularizing Feature Norm and Direction (ND), ICCV 2023"
    code = "WangYZ1608/Knowledge-Distillation-via-ND CIFAR/train_cifar_kd.py"

    warmed_terms = ("kd",)


@register_method("dkd_nd")
class DKDND(NDMixin, DKD):
    """DKD++: ce + warm-up * (tckd + nckd) + nd."""
    paper = "Wang et al., Improving Knowledge Distillation via Regularizing Feature Norm and Direction (ND), ICCV 2023"
    code = "WangYZ1608/Knowledge-Distillation-via-ND CIFAR/train_cifar_dkd.py"

    warmed_terms = ("tckd", "nckd")


@register_method("reviewkd_nd")
class ReviewKDND(NDMixin, ReviewKD):
    """ReviewKD++: ce + warm-up * reviewkd + nd."""
    paper = "Wang et al., Improving Knowledge Distillation via Regularizing Feature Norm and Direction (ND), ICCV 2023"
    code = "WangYZ1608/Knowledge-Distillation-via-ND CIFAR/ReviewKD++"

    warmed_terms = ("reviewkd",)


@register_method("dist_nd")
class DISTND(NDMixin, DIST):
    """DIST++: ce + warm-up * (inter + intra) + nd (the ND repo's CIFAR/DIST++, DIST with beta = gamma = 1 times
    --kd_loss_factor: here the weights of inter and intra)."""
    paper = "Wang et al., Improving Knowledge Distillation via Regularizing Feature Norm and Direction (ND), ICCV 2023"
    code = "WangYZ1608/Knowledge-Distillation-via-ND CIFAR/DIST++"

    warmed_terms = ("inter", "intra")
