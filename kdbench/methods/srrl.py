"""Yang et al. 2021, "Knowledge Distillation via Softmax Regression Representation Learning" (ICLR), as the CIFAR-100
code of DefangChen/SimKD (`models/util.py` SRRL, `helper/loops.py` train_distill) computes it.

Features: the pooled embeddings e_s (C_s) and e_t (C_t), and the teacher's logits z_t.
  connector T = Conv1x1(C_s -> C_t, no bias) + BN + ReLU applied to e_s viewed as a C_s x 1 x 1 map, flattened
            (66,048 parameters for resnet32x4 -> resnet8x4)
  srrl_fm = MSE(T(e_s), e_t)                        feature matching, mean over (N, C_t)
  srrl_sr = MSE(W_t T(e_s) + b_t, z_t)              softmax regression: the teacher's classifier (frozen copy, a
                                                    buffer) on the student's mapped feature, regressed onto the
                                                    teacher's logits, mean over (N, classes)
The reference sums the two (criterion_kd twice) under one weight `-b`; here they are two terms with that weight each.
Benchmark (`-c 1 -d 1 -b 1`): ce 1, kd 1 (T 4), srrl_fm 1, srrl_sr 1.
The authors' own repository (jingyang2017/KD_SRRL) has ImageNet code only, with a connector on the feature map and
a statistics-matching feature loss; the CIFAR benchmark numbers kdbench compares with come from the SimKD code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.methods.heads import apply_head, classifier_of, frozen_head


def srrl_feature_loss(mapped_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """mean((T(e_s) - e_t)^2); teacher detached."""
    return F.mse_loss(mapped_s, e_t.detach())


def srrl_regression_loss(mapped_s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         z_t: torch.Tensor) -> torch.Tensor:
    """mean((W_t T(e_s) + b_t - z_t)^2) with the teacher's classifier (W_t, b_t); teacher logits detached."""
    return F.mse_loss(apply_head(mapped_s, weight, bias), z_t.detach())


class SRRLConnector(nn.Module):
    """Conv1x1(C_s -> C_t, no bias) + BatchNorm2d + ReLU on the embedding as a 1x1 map, flattened back."""

    def __init__(self, c_s: int, c_t: int):
        super().__init__()
        self.transfer = nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t), nn.ReLU(inplace=True))

    def forward(self, e_s):
        return self.transfer(e_s.reshape(e_s.shape[0], -1, 1, 1)).flatten(1)


@register_method("srrl")
class SRRL(Method):
    paper = "Yang et al., Knowledge Distillation via Softmax Regression Representation Learning (SRRL), ICLR 2021"
    code = "DefangChen/SimKD models/util.py SRRL"
    student_taps = ("embedding",)
    teacher_taps = ("embedding",)  # the logits come with every teacher output

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        if pair.teacher is None:
            raise pair.incompatible(self.method_name, "it needs a teacher")
        head = classifier_of(pair, "teacher", self.method_name)
        s_shape = pair.student_shapes.get("embedding")
        if s_shape is None or len(s_shape) != 1:
            raise pair.incompatible(self.method_name, f"it needs the student's pooled embedding vector, and "
                                                      f"{pair.student_name} has {s_shape}")
        self.connector = SRRLConnector(int(s_shape[0]), head.in_features)
        weight, bias = frozen_head(head)
        self.register_buffer("teacher_weight", weight)
        self.register_buffer("teacher_bias", bias)

    def terms(self, batch, student, teacher):
        mapped = self.connector(student["embedding"])
        return {"srrl_fm": srrl_feature_loss(mapped, teacher["embedding"]),
                "srrl_sr": srrl_regression_loss(mapped, self.teacher_weight, self.teacher_bias, teacher["logits"])}
