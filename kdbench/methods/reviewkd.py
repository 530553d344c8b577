"""Chen et al. 2021, "Distilling Knowledge via Knowledge Review" (mdistiller ReviewKD; not in RepDistiller).

Student inputs: the post-ReLU stage outputs plus the pooled `embedding` as a 1x1 map, processed deepest first
([embedding, stage_L, ..., stage1]); with `student_preact: true` the PRE-activation stage outputs instead
(mdistiller REVIEWKD.STU_PREACT: False in its CIFAR-100 configs, True in configs/imagenet/*/reviewkd.yaml; the
authors' ImageNet code, dvlab-research/ReviewKD ImageNet/models/resnet.py and mobilenet.py, feeds the ABFs the
stage outputs before their ReLU too). Teacher targets: the PRE-activation stage outputs plus the pooled embedding,
[stage1_pre, ..., stage_L_pre, embedding]. One attention-based fusion (ABF) module per level:
  conv1 = Conv1x1(C_in -> C_mid, no bias) + BN;  conv2 = Conv3x3(C_mid -> C_out, pad 1, no bias) + BN;
  non-deepest levels also have att = Conv1x1(2 C_mid -> 2, bias) + Sigmoid;  conv weights kaiming_uniform(a=1);
  C_mid = min(max_mid_channel = 512, channels of the student embedding).
  forward: x = conv1(input); with the deeper level's residual y (nearest-upsampled to this level's size),
  w = att([x, y]), x = x w0 + y w1; x resized (nearest) to the teacher level's size; out = conv2(x), x passed on.
The channel/size configuration (mdistiller's IN_CHANNELS/OUT_CHANNELS/SHAPES/OUT_SHAPES) is derived from the probed
tap shapes of the pair; for resnet32x4 -> resnet8x4 it equals mdistiller's default ([64, 128, 256, 256],
[1, 8, 16, 32]; 1,808,774 extra parameters).
HCL loss per level (h = level height): MSE(mean) of the full maps (weight 1) plus, for l in (4, 2, 1) with l < h,
MSE of the adaptive-avg-pooled l x l maps with weights 0.5, 0.25, 0.125; divided by the sum of the weights used;
summed over levels. total = ce * CE + reviewkd * min(epoch / 20, 1) * HCL, ce 1, reviewkd 5.0 (mdistiller CIFAR).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.methods.common import flat_dim, stage_pairs, warmup_factor


def hcl_loss(f_s, f_t) -> torch.Tensor:
    """Hierarchical context loss summed over levels (teacher detached)."""
    total = 0.0
    for fs, ft in zip(f_s, f_t):
        ft = ft.detach()
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft)
        weight, weights_sum = 1.0, 1.0
        for l in (4, 2, 1):
            if l >= h:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, (l, l)), F.adaptive_avg_pool2d(ft, (l, l)))
            weights_sum += weight
        total = total + loss / weights_sum
    return total


class ABF(nn.Module):
    """Attention-based fusion of one student level with the residual from the deeper level."""

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, 1, bias=False), nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channel, out_channel, 3, padding=1, bias=False), nn.BatchNorm2d(out_channel))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channel, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, residual=None, out_size=None):
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, (h, w), mode="nearest")
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + residual * z[:, 1].view(n, 1, h, w)
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, tuple(out_size), mode="nearest")
        return self.conv2(x), x


def _as_map(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1, 1, 1) if x.dim() == 2 else x


@register_method("reviewkd")
class ReviewKD(Method):
    paper = "Chen et al., Distilling Knowledge via Knowledge Review, CVPR 2021"
    code = "megvii-research/mdistiller distillers/ReviewKD.py"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.warmup_epochs = float(cfg.get("warmup_epochs", 20))
        self.student_preact = bool(cfg.get("student_preact", False))
        stage_pre = stage_pairs(pair, self.method_name, align="equal", suffix="_pre")
        student = stage_pre if self.student_preact else stage_pairs(pair, self.method_name, align="equal")
        self.s_levels = [s for s, _ in student] + ["embedding"]  # shallow -> deep
        self.t_levels = [t for _, t in stage_pre] + ["embedding"]
        self.student_taps, self.teacher_taps = tuple(self.s_levels), tuple(self.t_levels)

        def chw(shapes, tap):
            shape = shapes[tap]
            return (flat_dim(shape), 1, 1) if tap == "embedding" else tuple(shape)

        s_shapes = [chw(pair.student_shapes, t) for t in self.s_levels]
        t_shapes = [chw(pair.teacher_shapes, t) for t in self.t_levels]
        in_channels = [s[0] for s in s_shapes]
        out_channels = [t[0] for t in t_shapes]
        self.out_sizes = [tuple(t[1:]) for t in t_shapes]
        mid = min(int(cfg.get("max_mid_channel", 512)), in_channels[-1])
        # built shallow -> deep (as mdistiller does), stored deep -> shallow (the order they run in)
        abfs = [ABF(c_in, mid, c_out, i < len(in_channels) - 1) for i, (c_in, c_out) in enumerate(zip(in_channels, out_channels))]
        self.abfs = nn.ModuleList(abfs[::-1])

    def review(self, student) -> list[torch.Tensor]:
        """The fused student features, shallow -> deep, each at its teacher level's size."""
        feats = [_as_map(student[t]) for t in self.s_levels][::-1]
        sizes = self.out_sizes[::-1]
        out, residual = self.abfs[0](feats[0], out_size=sizes[0])
        results = [out]
        for x, abf, size in zip(feats[1:], self.abfs[1:], sizes[1:]):
            out, residual = abf(x, residual, size)
            results.insert(0, out)
        return results

    def terms(self, batch, student, teacher):
        targets = [_as_map(teacher[t]) for t in self.t_levels]
        return {"reviewkd": hcl_loss(self.review(student), targets)}

    def term_weights(self, epoch):
        ramp = warmup_factor(epoch, self.warmup_epochs)
        return {k: (v * ramp if k == "reviewkd" else v) for k, v in self.weights.items()}
