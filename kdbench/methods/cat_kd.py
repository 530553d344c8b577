"""Guo et al. 2023, "Class Attention Transfer Based Knowledge Distillation" (CVPR; GzyAftermath/CAT-KD
`mdistiller/distillers/CAT_KD.py` CAT_loss, `mdistiller/models/cifar/*_test`, `tools/train.py`).

Class activation maps: CAM[k] = sum_c W[k, c] F[c] for the map F that the network average-pools into its embedding
(the reference's `conv_test`, a bias-free 1x1 conv holding the classifier's weights; see heads.pooled_map), so
GAP(CAM) = the logits without their bias.
  teacher: W_t copied from the teacher's trained classifier into a buffer; its bias is DROPPED (tools/train.py copies
           only fc.weight into conv_test), as the paper's CAM definition has no bias either;
  student: the student's own classifier weight, live (it trains through both CE and the CAT term).
  cat = MSE(pool_R(CAM_s), pool_R(CAM_t))  (mean over N x K x R x R), pool_R = adaptive average pool to R x R;
        with normalize, each pooled class map is first divided by its L2 norm over (R, R) (F.normalize, eps 1e-12)
Benchmark (configs/cifar100/CAT_KD/res32x4_res8x4.yaml): ce 1, cat 15, R 2, normalize off; the per-pair values of
the shipped configs are in conf/method/cat_kd.yaml. The reference's student is a `*_test` model whose classifier
has no bias (logits = GAP(CAM_s)); kdbench's students have one, so by default (student_fc_bias: false) the method
zeroes the student's classifier bias and freezes it (requires_grad False: out of the optimizer and the parameter
count); student_fc_bias: true keeps it trained.
For a WRN the pooled map is relu(bn1(stage3)), read as relu(stage3_pre): on a WRN student in training mode that tap
calls bn1 a second time (kdbench.models.wrn), so bn1's running statistics take two updates per step where the
reference's wrn_test takes one (same batch statistics, a faster moving average; the training forward is unchanged).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdbench.distill import Method, register_method
from kdbench.methods.heads import classifier_of, pooled_map


def class_activation_maps(f: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(N, K, H, W): CAM[n, k] = sum_c weight[k, c] f[n, c] (a bias-free 1x1 conv with the classifier's weights)."""
    return torch.einsum("nchw,kc->nkhw", f, weight)


def cat_loss(cam_s: torch.Tensor, cam_t: torch.Tensor, resolution: int, normalize: bool = False) -> torch.Tensor:
    """MSE of the R x R average-pooled CAMs (each class map L2-normalised over its R x R cells when normalize);
    teacher CAMs detached."""
    s = F.adaptive_avg_pool2d(cam_s, (resolution, resolution))
    t = F.adaptive_avg_pool2d(cam_t.detach(), (resolution, resolution))
    if normalize:
        s, t = F.normalize(s, dim=(2, 3)), F.normalize(t, dim=(2, 3))
    return F.mse_loss(s, t)


@register_method("cat_kd")
class CATKD(Method):
    paper = "Guo et al., Class Attention Transfer Based Knowledge Distillation, CVPR 2023"
    code = "GzyAftermath/CAT-KD mdistiller/distillers/CAT_KD.py"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        name = self.method_name
        if pair.teacher is None:
            raise pair.incompatible(name, "it needs a teacher")
        self.resolution = int(cfg.get("cam_resolution", 2))
        self.normalize = bool(cfg.get("normalize", False))
        self.student_fc_bias = bool(cfg.get("student_fc_bias", False))
        self.s_tap, self.s_relu = pooled_map(pair, "student", name)
        self.t_tap, self.t_relu = pooled_map(pair, "teacher", name)
        self.student_taps, self.teacher_taps = (self.s_tap,), (self.t_tap,)
        t_head = classifier_of(pair, "teacher", name)
        s_head = classifier_of(pair, "student", name)
        self._student_head = (s_head,)  # a reference, not a submodule: its weight is the student's parameter
        self.register_buffer("teacher_weight", t_head.weight.detach().clone())
        if not self.student_fc_bias and s_head.bias is not None:
            with torch.no_grad():
                s_head.bias.zero_()
            s_head.bias.requires_grad_(False)

    @property
    def student_weight(self) -> torch.Tensor:
        return self._student_head[0].weight

    def maps(self, student, teacher) -> tuple[torch.Tensor, torch.Tensor]:
        f_s, f_t = student[self.s_tap], teacher[self.t_tap]
        return (F.relu(f_s) if self.s_relu else f_s), (F.relu(f_t) if self.t_relu else f_t)

    def terms(self, batch, student, teacher):
        f_s, f_t = self.maps(student, teacher)
        cam_s = class_activation_maps(f_s, self.student_weight)
        cam_t = class_activation_maps(f_t.detach(), self.teacher_weight)
        return {"cat": cat_loss(cam_s, cam_t, self.resolution, self.normalize)}
