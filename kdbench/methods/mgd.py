"""Yue, Deng, Dai, Liu, Ma & Liu (ECCV 2020), "Matching Guided Distillation" (MGD; kaiyuyue/mgd `mgd/builder.py`
MGDistiller with the `amp` reducer, `cls/main_mgd.py`).

Features: the PRE-activation stage maps of both nets (`stageN_pre`), the deepest min(L_s, L_t) levels (as OFD). Per
level, teacher channels (C_t >= C_s) are matched to student channels by a linear assignment, then reduced to C_s:

  matching  cost[i, j] = mean over the tracked images of 2 - 2 cos(s_i, t_j), s_i / t_j the spatially flattened,
            L2-normalised channel maps (student raw pre-activation, teacher), tracked in eval mode without gradient
            over the training data (at most `track_images` images, the code's 20,000). The cost is tiled G = C_t // C_s
            times over the rows and solved as a linear sum assignment (the code uses OR-tools, kdbench
            scipy.optimize.linear_sum_assignment: both exact); when C_t % C_s != 0 only the first G * C_s teacher
            channels take part (the code's "shave"). Row r = g * C_s + i gives the teacher channel of student
            channel i in group g. Solved before epoch 1 and again after every `update_freq` epochs (the code's
            --mgd-update-freq), kept in buffers (so a resumed run keeps it).
  reducer   amp (absolute max pooling): per student channel i and position, the grouped teacher value of largest |.|;
            margins (OFD's, from the teacher's BN before each ReLU) averaged over the group.
  loss      per level: sum over N, C, H, W of (bn(s) - max(t~, m))^2 where bn(s) > max(t~, m) or max(t~, m) > 0
            (t~ = reduced teacher map, bn = a trainable BatchNorm2d on the student map), divided by 2^(L - i - 1)
            (deeper levels weigh more); summed over levels and divided by the batch size.
total = ce * CE + mgd * MGD with mgd = 1 / loss_factor = 1e-4 (the code's --loss-factor 1e4, "for input size 224";
the paper's CIFAR-100 factor is in no released config). Teacher in eval mode (main_mgd.py: t_net.eval()). Maps of
different sizes: the larger is average-pooled to the smaller (kdbench's addition; the code assumes equal sizes).
Extra parameters: the student-side BatchNorm2d per level (2 * C_s each).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.methods.common import match_spatial, stage_pairs
from kdbench.methods.ofd import ofd_margin
from kdbench.train import epoch_seed

FLOW_STREAM = 11  # epoch_seed stream of the tracking pass's batch order


def channel_cost(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(C_s, C_t) sum over the batch of 2 - 2 cos(s_i, t_j) between L2-normalised flattened channel maps."""
    s = F.normalize(s.flatten(2), p=2, dim=2)
    t = F.normalize(t.flatten(2), p=2, dim=2)
    return (2 - 2 * torch.bmm(s, t.transpose(1, 2))).sum(0)


def solve_flow(cost: torch.Tensor) -> torch.Tensor:
    """The teacher channel of each of the G * C_s rows (G = C_t // C_s) from the (C_s, C_t) mean cost, by linear sum
    assignment on the cost tiled G times (only the first G * C_s teacher channels when C_t % C_s != 0)."""
    from scipy.optimize import linear_sum_assignment

    c_s, c_t = cost.shape
    groups = c_t // c_s
    tiled = cost.double().repeat(groups, 1)  # row g * C_s + i is student channel i in group g
    if c_t % c_s:
        tiled = tiled[:, : groups * c_s]
    rows, cols = linear_sum_assignment(tiled.cpu().numpy())
    flow = torch.empty(len(rows), dtype=torch.long)
    flow[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return flow


def amp_reduce(t: torch.Tensor, margin: torch.Tensor, flow: torch.Tensor, c_s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C_s, H, W) teacher map of the grouped value of largest |.| per channel and position, (1, C_s, 1, 1) margin
    averaged over the group; group g of student channel i is teacher channel flow[g * C_s + i]."""
    n, _, h, w = t.shape
    groups = len(flow) // c_s
    grouped = t[:, flow.to(t.device)].view(n, groups, c_s, h * w).transpose(1, 2)  # (N, C_s, G, HW)
    pick = grouped.abs().argmax(dim=2, keepdim=True)
    reduced = grouped.gather(2, pick).view(n, c_s, h, w)
    m = margin.to(t)[flow.to(t.device)].view(groups, c_s).mean(0).view(1, c_s, 1, 1)
    return reduced, m


def mgd_level_loss(s: torch.Tensor, t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """sum of (s - max(t, m))^2 where s > max(t, m) or max(t, m) > 0 (the code's distillation_loss)."""
    target = torch.max(t.detach(), margin)
    mask = ((s > target) | (target > 0)).to(s.dtype)
    return ((s - target).pow(2) * mask).sum()


def mgd_loss(s_maps, t_maps, margins, flows) -> torch.Tensor:
    """sum_i mgd_level_loss(s_i, amp(t_i), m_i) / 2^(L - i - 1), divided by the batch size; s_i already through the
    student BN, maps already matched in size."""
    levels = len(s_maps)
    total = 0.0
    for i, (s, t, m, flow) in enumerate(zip(s_maps, t_maps, margins, flows, strict=True)):
        t_red, m_red = amp_reduce(t.detach(), m, flow, s.shape[1])
        total = total + mgd_level_loss(s, t_red, m_red) / 2 ** (levels - i - 1)
    return total / s_maps[0].shape[0]


@register_method("mgd")
class MGD(Method):
    paper = "Yue et al., Matching Guided Distillation, ECCV 2020"
    code = "kaiyuyue/mgd"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        if pair.teacher is None:
            raise pair.incompatible(self.method_name, "it needs a teacher")
        self.pairs = stage_pairs(pair, self.method_name, align="last", suffix="_pre")
        self.student_taps = tuple(s for s, _ in self.pairs)
        self.teacher_taps = tuple(t for _, t in self.pairs)
        try:
            bns = list(pair.teacher.bn_before_relu())
        except NotImplementedError as err:
            raise pair.incompatible(self.method_name, f"its margins need the teacher's BN-before-ReLU layers: {err}") from None
        stages = list(pair.teacher.stage_names)
        self.update_freq = int(cfg.get("update_freq", 1))
        self.track_images = int(cfg.get("track_images", 20000))
        self.reducer = str(cfg.get("reducer", "amp"))
        if self.reducer != "amp":
            raise pair.incompatible(self.method_name, f"reducer '{self.reducer}' is not implemented (amp is)")
        bn_list = []
        for i, (s, t) in enumerate(self.pairs):
            c_s, c_t = pair.student_shapes[s][0], pair.teacher_shapes[t][0]
            if c_t < c_s:
                raise pair.incompatible(self.method_name, f"it reduces teacher channels to the student's, but teacher "
                                                          f"{t} has {c_t} channels and student {s} has {c_s}")
            bn = bns[stages.index(t[: -len("_pre")])]
            self.register_buffer(f"margin{i + 1}", ofd_margin(bn.weight, bn.bias))
            groups = c_t // c_s
            self.register_buffer(f"flow{i + 1}", torch.arange(groups * c_s) % c_t)  # replaced before epoch 1
            bn_list.append(nn.BatchNorm2d(c_s))
        self.bns = nn.ModuleList(bn_list)
        self.register_buffer("flow_epoch", torch.tensor(-1))  # the epoch after which the flow was solved (0: before 1)
        self.seed = pair.seed
        self._loader = None

    @property
    def margins(self):
        return [getattr(self, f"margin{i + 1}") for i in range(len(self.pairs))]

    @property
    def flows(self):
        return [getattr(self, f"flow{i + 1}") for i in range(len(self.pairs))]

    def terms(self, batch, student, teacher):
        s_maps, t_maps = [], []
        for bn, (s, t) in zip(self.bns, self.pairs):
            a, b = match_spatial(bn(student[s]), teacher[t])
            s_maps.append(a)
            t_maps.append(b)
        return {"mgd": mgd_loss(s_maps, t_maps, self.margins, self.flows)}

    # -- the matching: solved from a tracking pass before epoch 1 and after every update_freq epochs

    def flow_due(self, epoch: int) -> int:
        """The epoch after which the flow used in `epoch` is solved (0 = before training)."""
        return ((epoch - 1) // self.update_freq) * self.update_freq

    @torch.no_grad()
    def update_flow(self, loader, step, after_epoch: int) -> None:
        student = step.run.student
        was_student, was_method = student.training, self.training
        student.eval()
        self.eval()
        costs, seen = None, 0
        try:
            for batch in loader.epoch(epoch_seed(self.seed, after_epoch, FLOW_STREAM)):
                t_out = step.teacher(batch)
                s_out = step.forward(batch.inputs, self.student_taps)
                level = []
                for s, t in self.pairs:
                    a, b = match_spatial(s_out[s].float(), t_out[t].float())
                    level.append(channel_cost(a, b))
                costs = level if costs is None else [c + d for c, d in zip(costs, level)]
                seen += len(batch)
                if seen >= self.track_images:
                    break
        finally:
            student.train(was_student)
            self.train(was_method)
        for i, cost in enumerate(costs):
            getattr(self, f"flow{i + 1}").copy_(solve_flow(cost / seen))
        self.flow_epoch.fill_(after_epoch)

    def batches(self, loader, seed):
        self._loader = loader
        return loader.epoch(seed)

    def train_step(self, batch, step):
        due = self.flow_due(step.epoch)
        if int(self.flow_epoch) != due and self._loader is not None:
            self.update_flow(self._loader, step, due)
        return super().train_step(batch, step)

    def record_fields(self):
        return {"evaluated_head": "student", "trained_heads": ["student_bns"], "flow_update_freq": self.update_freq}
