"""Chen et al. 2021, "Cross-Layer Distillation with Semantic Calibration" (AAAI; DefangChen/SimKD `models/util.py`
SelfA, Proj, MLPEmbed and `distiller_zoo/SemCKD.py` SemCKDLoss; DefangChen/SemCKD is the same computation).

Features: every stage output of each network (the reference's feat[1:-1]: stage1..3 for the CIFAR ResNets/WRNs/
ShuffleNets, stage1..4 for VGG/MobileNetV2/ResNet50), post-activation, L_s student and L_t teacher levels.
  Gram rows: for each level, G = F F^T with F the (N, C*H*W) flattened map, so G is N x N.
  query_i = MLPEmbed_i(G_s_i), key_j = MLPEmbed_j(G_t_j); MLPEmbed(d -> d/4) = Linear(d, d/2) -> ReLU ->
            Linear(d/2, d/4) -> x / ||x||_2 (no epsilon), with d = the batch size (the reference's feat_dim).
  attention a[n, i, :] = softmax_j(query_i[n] . key_j[n] / soft)            (soft = 1)
  for every (i, j): the map of larger height is adaptive-average-pooled to the other's; the student map goes through
            Proj_ij = Conv1x1(C_s -> 2C_t) + BN + ReLU -> Conv3x3(2C_t -> 2C_t, pad 1) + BN + ReLU -> Conv1x1(2C_t -> C_t)
            (no conv biases); MSE_n(i, j) = mean over (C, H, W) of (Proj_ij(f_s_i) - f_t_j)^2 per sample n
  semckd = sum_{n,i,j} a[n,i,j] MSE_n(i,j) / (N * L_s)                     (teacher maps detached)
Benchmark (`-c 1 -d 1 -b 400`, SimKD/SemCKD scripts): ce 1, kd 1 (T 4), semckd 400.
The MLPs' input width is the batch size, so the reference skips a batch smaller than it (the epoch's last one);
train_step here does the same (no update, no terms logged for that batch; the epoch's logged means are then
divided by all samples including the skipped ones, a 16/50,000 difference on CIFAR at batch 64). Extra parameters for
resnet32x4 -> resnet8x4: 10,233,632 (the reference's count, 10,249,280, includes MLPEmbed.regressor, a duplicate
Sequential its forward never uses; not built here).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError
from kdbench.methods.common import match_spatial


def gram_rows(f: torch.Tensor) -> torch.Tensor:
    """(N, N) Gram matrix of the flattened maps: G[a, b] = <f_a, f_b>."""
    flat = f.reshape(f.shape[0], -1)
    return flat @ flat.t()


def semckd_attention(queries: torch.Tensor, keys: torch.Tensor, soft: float = 1.0) -> torch.Tensor:
    """(N, L_s, L_t) = softmax over teacher levels of <query_i, key_j> / soft; queries (N, L_s, d), keys (N, L_t, d)."""
    return F.softmax(torch.bmm(queries, keys.transpose(1, 2)) / soft, dim=-1)


def semckd_loss(s_values: Sequence[Sequence[torch.Tensor]], t_values: Sequence[Sequence[torch.Tensor]],
                attention: torch.Tensor) -> torch.Tensor:
    """sum_{n,i,j} a[n,i,j] * mean_{c,h,w}(s_values[i][j][n] - t_values[i][j][n])^2 / (N * L_s).

    s_values[i][j]: the projected student map of level i for teacher level j; t_values[i][j]: that teacher map at the
    matching size (detached here)."""
    n, l_s, l_t = attention.shape
    per_sample = torch.stack([torch.stack([(s_values[i][j] - t_values[i][j].detach()).pow(2).reshape(n, -1).mean(1)
                                           for j in range(l_t)], dim=1) for i in range(l_s)], dim=1)  # (N, L_s, L_t)
    return (attention * per_sample).sum() / (n * l_s)


class MLPEmbed(nn.Module):
    """Linear(d, 2 d_out) -> ReLU -> Linear(2 d_out, d_out) -> L2 normalisation (x / ||x||, no epsilon)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear1 = nn.Linear(dim_in, 2 * dim_out)
        self.linear2 = nn.Linear(2 * dim_out, dim_out)

    def forward(self, x):
        x = self.linear2(F.relu(self.linear1(x.reshape(x.shape[0], -1))))
        return x / x.pow(2).sum(1, keepdim=True).sqrt()


class Proj(nn.Sequential):
    """Conv1x1(C_s -> 2C_t) + BN + ReLU, Conv3x3(2C_t -> 2C_t) + BN + ReLU, Conv1x1(2C_t -> C_t); no conv biases."""

    def __init__(self, c_s: int, c_t: int):
        mid = 2 * c_t
        super().__init__(nn.Conv2d(c_s, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                         nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                         nn.Conv2d(mid, c_t, 1, bias=False))


@register_method("semckd")
class SemCKD(Method):
    paper = "Chen et al., Cross-Layer Distillation with Semantic Calibration (SemCKD), AAAI 2021"
    code = "DefangChen/SimKD distiller_zoo/SemCKD.py"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        name = self.method_name
        if pair.teacher is None:
            raise pair.incompatible(name, "it needs a teacher")
        s_taps, t_taps = tuple(pair.student.stage_names), tuple(pair.teacher.stage_names)
        if not s_taps or not t_taps:
            raise pair.incompatible(name, f"it needs stage feature maps, and {pair.student_name} has {list(s_taps)}, "
                                          f"{pair.teacher_name} has {list(t_taps)}")
        s_shapes = [self._map_shape(pair, name, "student", t, pair.student_shapes) for t in s_taps]
        t_shapes = [self._map_shape(pair, name, "teacher", t, pair.teacher_shapes) for t in t_taps]
        self.student_taps, self.teacher_taps = s_taps, t_taps
        self.batch_size = int(cfg.get("batch_size", 64))
        self.factor = int(cfg.get("factor", 4))
        self.soft = float(cfg.get("soft", 1.0))
        d_out = self.batch_size // self.factor
        if d_out < 1:
            raise KDBenchError(f"semckd: batch_size {self.batch_size} must be at least factor {self.factor}")
        self.queries = nn.ModuleList(MLPEmbed(self.batch_size, d_out) for _ in s_taps)
        self.keys = nn.ModuleList(MLPEmbed(self.batch_size, d_out) for _ in t_taps)
        self.projs = nn.ModuleList(Proj(cs[0], ct[0]) for cs in s_shapes for ct in t_shapes)  # index i * L_t + j

    @staticmethod
    def _map_shape(pair, method, side, tap, shapes):
        shape = shapes.get(tap)
        if shape is None or len(shape) != 3:
            raise pair.incompatible(method, f"it needs (C, H, W) feature maps, but the {side}'s tap '{tap}' is "
                                            f"{'missing' if shape is None else 'x'.join(map(str, shape))}")
        return tuple(shape)

    def calibrate(self, f_s: Sequence[torch.Tensor], f_t: Sequence[torch.Tensor]):
        """(projected student maps s[i][j], teacher maps t[i][j] at the matching size, attention (N, L_s, L_t))."""
        n = f_s[0].shape[0]
        if n != self.batch_size:
            raise KDBenchError(f"semckd: the attention MLPs take batches of exactly {self.batch_size} (method."
                               f"batch_size, = trainer.batch_size in the shipped config), got {n}")
        f_t = [f.detach() for f in f_t]
        queries = torch.stack([q(gram_rows(f)) for q, f in zip(self.queries, f_s)], dim=1)
        keys = torch.stack([k(gram_rows(f)) for k, f in zip(self.keys, f_t)], dim=1)
        attention = semckd_attention(queries, keys, self.soft)
        s_values, t_values = [], []
        for i, fs in enumerate(f_s):
            row_s, row_t = [], []
            for j, ft in enumerate(f_t):
                a, b = match_spatial(fs, ft)
                row_s.append(self.projs[i * len(f_t) + j](a))
                row_t.append(b)
            s_values.append(row_s)
            t_values.append(row_t)
        return s_values, t_values, attention

    def terms(self, batch, student, teacher):
        s_values, t_values, attention = self.calibrate([student[t] for t in self.student_taps],
                                                       [teacher[t] for t in self.teacher_taps])
        return {"semckd": semckd_loss(s_values, t_values, attention)}

    def train_step(self, batch, step):
        if len(batch) < self.batch_size:  # the reference's `continue`: no forward, no update
            return torch.zeros((), device=batch.inputs.device), {}
        return super().train_step(batch, step)
