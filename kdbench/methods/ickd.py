"""Liu et al. 2021, "Exploring Inter-Channel Correlation for Diversity-preserved Knowledge Distillation" (ICCV;
ADLab-AutoDrive/ICKD `Cifar100/distiller_zoo/ICKD.py` ICKDLoss, `Cifar100/train_student.py`; torchdistill
`losses/mid_level.py` ChSimLoss + `models/wrapper.py` ChannelSimilarityEmbed).

Features: the last stage map of each network (the reference's feat[-2]), f_s (C_s x H_s x W_s), f_t (C_t x H_t x W_t).
  embed: E(f_s) = BN(Conv_kxk(C_s -> C_t, no bias))   (k = 1 in the authors' CIFAR code, 3 in torchdistill's port;
         66,048 parameters for resnet32x4 -> resnet8x4 with k = 1)
  G(f)[n] = normalize_rows(F_n F_n^T), F_n the C x HW matrix of sample n; rows L2-normalised (F.normalize, eps 1e-12).
         G is C_t x C_t whatever H, W, so maps of different sizes need no pooling.
  ickd = sum_{n,i,j} (G(E(f_s))[n,i,j] - G(f_t)[n,i,j])^2 / (C_t * N)         (authors' CIFAR code; teacher detached)
       = the same / (C_t * N^2)                                               (torchdistill, `normalizer: batch_squared`)
Benchmark (the authors' CIFAR-100 README: `-a 0 -b 2.5`, ICKD-C w/o KL): ce 1, ickd 2.5. ICKD-C with KL (`-a 1`) is
config ickd_kd (kd 1, T 4). The authors' code also builds an `embed_t` that its forward never uses (another 66,048
parameters in their count); not built here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError
from kdbench.methods.common import stage_pairs

NORMALIZERS = ("batch", "batch_squared")


def channel_correlation(f: torch.Tensor) -> torch.Tensor:
    """(N, C, C): F F^T per sample (F = the C x HW map), each row L2-normalised."""
    flat = f.reshape(f.shape[0], f.shape[1], -1)
    return F.normalize(torch.bmm(flat, flat.transpose(1, 2)), dim=2)


def ickd_loss(embedded_s: torch.Tensor, f_t: torch.Tensor, normalizer: str = "batch") -> torch.Tensor:
    """sum (G_s - G_t)^2 / (C N) ('batch', authors) or / (C N^2) ('batch_squared', torchdistill); teacher detached."""
    if normalizer not in NORMALIZERS:
        raise KDBenchError(f"ickd normalizer must be one of {NORMALIZERS}, got '{normalizer}'")
    n, c = embedded_s.shape[0], embedded_s.shape[1]
    diff = channel_correlation(embedded_s) - channel_correlation(f_t.detach())
    denom = c * n * (n if normalizer == "batch_squared" else 1)
    return diff.pow(2).sum() / denom


class ChannelEmbed(nn.Sequential):
    """Conv k x k (C_s -> C_t, stride 1, 'same' padding, no bias) + BatchNorm2d(C_t)."""

    def __init__(self, c_s: int, c_t: int, kernel: int = 1):
        super().__init__(nn.Conv2d(c_s, c_t, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_t))


@register_method("ickd")
class ICKD(Method):
    paper = "Liu et al., Exploring Inter-Channel Correlation for Diversity-preserved Knowledge Distillation, ICCV 2021"
    code = "ADLab-AutoDrive/ICKD Cifar100/distiller_zoo/ICKD.py"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        (s_tap, t_tap), = stage_pairs(pair, self.method_name, align="last")[-1:]
        self.student_taps, self.teacher_taps = (s_tap,), (t_tap,)
        self.normalizer = str(cfg.get("normalizer", "batch"))
        if self.normalizer not in NORMALIZERS:
            raise KDBenchError(f"ickd normalizer must be one of {NORMALIZERS}, got '{self.normalizer}'")
        kernel = int(cfg.get("embed_kernel", 1))
        self.embed = ChannelEmbed(pair.student_shapes[s_tap][0], pair.teacher_shapes[t_tap][0], kernel)

    def terms(self, batch, student, teacher):
        (s_tap,), (t_tap,) = self.student_taps, self.teacher_taps
        return {"ickd": ickd_loss(self.embed(student[s_tap]), teacher[t_tap], self.normalizer)}
