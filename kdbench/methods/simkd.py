"""Chen et al. 2022, "Knowledge Distillation with the Reused Teacher Classifier" (CVPR; DefangChen/SimKD
`models/util.py` SimKD, `helper/loops.py` train_distill / validate_distill).

Features: the student's last stage map f_s (the reference's feat[-2]) and the teacher map its classifier pools,
f_t (feat[-2]: the last stage for the CIFAR ResNets/VGG/ShuffleV1/ResNet50; relu(bn1(stage3)) for a WRN teacher,
see kdbench.methods.heads.pooled_map). The map of the larger height is adaptive-average-pooled to the other's.
Projector (trainable, "factor" f = 2, every conv without bias):
  P = Conv1x1(C_s -> C_t/f) + BN + ReLU -> Conv3x3(C_t/f -> C_t/f, pad 1) + BN + ReLU -> Conv1x1(C_t/f -> C_t) + BN
      + ReLU      (214,016 parameters for resnet32x4 -> resnet8x4: C_s = C_t = 256)
Loss (the only term in the reference's CIFAR command `-c 0 -d 0 -b 1`):
  simkd = MSE(P(f_s), f_t) = mean over (N, C, H, W) of (P(f_s) - f_t)^2       (teacher side detached)
Evaluation (train_distill's metrics and validate_distill): the teacher's classifier, frozen, on the pooled
projected feature: logits = W_t GAP(P(f_s)) + b_t. Here W_t, b_t are copied from the teacher's classifier into
buffers when the method is built (not parameters: never in the optimizer, never trained).
The `ce` term is the reference's loss_cls: the cross entropy of the student's OWN logits (computed before the
reference swaps logit_s for the reused-classifier prediction), weight 0 in the benchmark; `kd` (optional, weight
`-d`) likewise uses the student's own logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError
from kdbench.methods.common import match_spatial
from kdbench.methods.heads import apply_head, classifier_of, frozen_head, pooled_map

EVAL_HEADS = ("teacher_classifier", "student")


def simkd_loss(projected_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """mean((P(f_s) - f_t)^2) over every element (nn.MSELoss(), SimKD's criterion_kd); teacher detached."""
    return F.mse_loss(projected_s, f_t.detach())


def reused_classifier_logits(projected_s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SimKD's prediction: the teacher classifier (W_t, b_t) on the global average pool of the projected map."""
    return apply_head(projected_s.mean((2, 3)), weight, bias)


def _conv_bn_relu(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SimKDProjector(nn.Sequential):
    """1x1 (C_s -> C_t/f), 3x3 (C_t/f -> C_t/f), 1x1 (C_t/f -> C_t), each conv (no bias) + BN + ReLU."""

    def __init__(self, c_s: int, c_t: int, factor: int = 2):
        mid = c_t // factor
        super().__init__(*_conv_bn_relu(c_s, mid, 1), *_conv_bn_relu(mid, mid, 3), *_conv_bn_relu(mid, c_t, 1))


@register_method("simkd")
class SimKD(Method):
    paper = "Chen et al., Knowledge Distillation with the Reused Teacher Classifier (SimKD), CVPR 2022"
    code = "DefangChen/SimKD models/util.py"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        name = self.method_name
        if pair.teacher is None:
            raise pair.incompatible(name, "it needs a teacher")
        self.eval_head = str(cfg.get("eval_head", "teacher_classifier"))
        if self.eval_head not in EVAL_HEADS:
            raise KDBenchError(f"simkd eval_head must be one of {EVAL_HEADS}, got '{self.eval_head}'")
        self.factor = int(cfg.get("factor", 2))
        s_stages = tuple(pair.student.stage_names)
        if not s_stages or len(pair.student_shapes.get(s_stages[-1], ())) != 3:
            raise pair.incompatible(name, f"it needs the student's last feature map, and {pair.student_name} has "
                                          f"stages {list(s_stages)}")
        self.s_tap = s_stages[-1]
        self.t_tap, self.t_relu = pooled_map(pair, "teacher", name)
        head = classifier_of(pair, "teacher", name)
        c_s, h_s, _ = pair.student_shapes[self.s_tap]
        c_t, h_t, w_t = pair.teacher_shapes[self.t_tap]
        if c_t % self.factor:
            raise pair.incompatible(name, f"factor {self.factor} does not divide the teacher's {c_t} channels")
        self.t_size = (h_t, w_t)
        self.student_taps, self.teacher_taps = (self.s_tap,), (self.t_tap,)
        self.projector = SimKDProjector(c_s, c_t, self.factor)
        weight, bias = frozen_head(head)
        self.register_buffer("teacher_weight", weight)
        self.register_buffer("teacher_bias", bias)

    def teacher_map(self, teacher) -> torch.Tensor:
        f_t = teacher[self.t_tap]
        return F.relu(f_t) if self.t_relu else f_t

    def project(self, f_s: torch.Tensor) -> torch.Tensor:
        """P(f_s), the student map first pooled to the teacher map's size when it is larger (the reference's rule)."""
        if f_s.shape[-2] > self.t_size[0]:
            f_s = F.adaptive_avg_pool2d(f_s, self.t_size)
        return self.projector(f_s)

    def terms(self, batch, student, teacher):
        f_s, f_t = match_spatial(student[self.s_tap], self.teacher_map(teacher))
        return {"simkd": simkd_loss(self.projector(f_s), f_t)}

    def eval_logits(self, student, inputs):
        """The run's evaluated head (option eval_head): SimKD's reused teacher classifier (default), or the
        student's own classifier. The projector's BN runs in eval mode here."""
        if self.eval_head == "student":
            return student(inputs)
        f_s = student.forward_taps(inputs, self.student_taps)[self.s_tap]
        was = self.training
        self.eval()
        try:
            return reused_classifier_logits(self.project(f_s), self.teacher_weight, self.teacher_bias)
        finally:
            self.train(was)
