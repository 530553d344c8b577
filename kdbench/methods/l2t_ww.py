"""Jang, Lee, Hwang & Shin (ICML 2019), "Learning What and Where to Transfer" (L2T-ww; alinlab/L2T-ww
`train_l2t_ww.py` FeatureMatching / WeightNetwork / LossWeightNetwork, `train/meta_optimizers.py` MetaSGD).

Feature matching between source (teacher) map S_i and target (student) map T_j for every pair (i, j) of `pairs`,
weighted by meta-networks that read the source features ("what" = channel weights, "where" = pair weights):

  match_ij(x) = sum_c w_ij,c(x) * mean_{h,w} (S_i - r_ij(T_j))^2_c      r_ij = Conv1x1(C_j -> C_i) with bias (trained
                                                                        with the student); S_i bilinearly resized
                                                                        to T_j's size when they differ
  w_ij(x)      = softmax(Linear(GAP(S_i)))          (zero-initialised: uniform channel weights)  -- WeightNetwork
  lambda_ij(x) = relu6(Linear(GAP(S_i)))            (bias initialised to 1)                      -- LossWeightNetwork
  l2t_match    = sum_{(i,j)} mean_n lambda_ij(x_n) * match_ij(x_n)
total (inner objective) = ce * CE + l2t_match * l2t_match with l2t_match = beta = 0.5 (the code's --beta).

Each step (the code's order): (1) the student step: one SGD step of the run's optimizer on the inner objective
(student and the r_ij); (2) the meta step: from the updated student, T = 2 look-ahead SGD steps on l2t_match alone and
one on CE (the learning rate and weight decay of the run's optimizer), then the CE of the looked-ahead student on the
same batch is differentiated through the look-ahead steps into the meta-networks, which Adam updates (meta_lr 1e-4,
weight decay 1e-4); the student is rolled back to its state after (1) (MetaSGD rollback=True, BatchNorm buffers
included). Option order: meta_first runs (2) before (1) on each batch.
The look-ahead steps are SGD with the run optimizer's momentum, starting from its momentum buffers (as MetaSGD steps
with the real optimizer state, restored afterwards), unrolled with autograd (MetaSGD writes the same adjoint
recurrence by hand). Differences from the code: the meta-networks' Adam state is not in the checkpoint (a resumed run
restarts its moments); the source network is the run's teacher trained on the same data (the code transfers from a
network pre-trained on another domain: ImageNet -> CUB/Dogs, TinyImageNet -> CIFAR-100/STL-10).
Pairs: `all` (every teacher stage with every student stage; the code's ImageNet default pairs 4 x 4 layers) or
`same` (stage k with stage k). Extra parameters: the r_ij (trained with the student) and the meta-networks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from kdbench.distill import Method, register_method
from kdbench.methods.common import stage_pairs


def l2t_pair_loss(source: torch.Tensor, mapped_target: torch.Tensor, channel_weights: torch.Tensor,
                  pair_weight: torch.Tensor) -> torch.Tensor:
    """mean_n lambda_n * sum_c w_nc * mean_hw (S - r(T))^2: one pair's weighted matching loss; source detached."""
    source = source.detach()
    if source.shape[-1] != mapped_target.shape[-1]:
        source = F.interpolate(source, size=mapped_target.shape[-2:], mode="bilinear")
    diff = (source - mapped_target).pow(2).mean(dim=(2, 3))  # (N, C_source)
    return ((diff * channel_weights).sum(1) * pair_weight.reshape(-1)).mean(0)


class WeightNetwork(nn.Module):
    """What to transfer: softmax(Linear(GAP(S_i))) per pair, zero-initialised."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Linear(channels, channels)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, source):
        return F.softmax(self.fc(source.detach().mean(dim=(2, 3))), dim=1)


class LossWeightNetwork(nn.Module):
    """Where to transfer: relu6(Linear(GAP(S_i))) per pair and sample, bias initialised to `init`."""

    def __init__(self, channels: int, init: float = 1.0):
        super().__init__()
        self.fc = nn.Linear(channels, 1)
        nn.init.constant_(self.fc.bias, init)

    def forward(self, source):
        return F.relu6(self.fc(source.detach().mean(dim=(2, 3))))


class _Target(nn.Module):
    """The student and its matching convs as one module, for the functional look-ahead."""

    def __init__(self, student, regressors):
        super().__init__()
        self.student, self.regressors = student, regressors

    def forward(self, x, taps):
        return self.student.forward_taps(x, taps)


@register_method("l2t_ww")
class L2TWW(Method):
    paper = "Jang et al., Learning What and Where to Transfer, ICML 2019"
    code = "alinlab/L2T-ww"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        if pair.teacher is None:
            raise pair.incompatible(self.method_name, "it needs a teacher (the source network)")
        levels = stage_pairs(pair, self.method_name, align="first")
        s_stages = [s for s, _ in levels]
        t_stages = [t for _, t in levels]
        if len(pair.student.stage_names) > len(s_stages):
            s_stages = list(pair.student.stage_names)
        if len(pair.teacher.stage_names) > len(t_stages):
            t_stages = list(pair.teacher.stage_names)
        mode = str(cfg.get("pairs", "all"))
        if mode == "all":
            self.pairs = [(t, s) for t in t_stages for s in s_stages]
        elif mode == "same":
            self.pairs = [(t, s) for s, t in levels]
        else:
            raise pair.incompatible(self.method_name, f"pairs must be 'all' or 'same', got '{mode}'")
        for t, s in self.pairs:
            for side, shapes, tap in (("teacher", pair.teacher_shapes, t), ("student", pair.student_shapes, s)):
                if len(shapes.get(tap, ())) != 3:
                    raise pair.incompatible(self.method_name, f"it needs (C, H, W) maps, the {side}'s {tap} is "
                                                              f"{shapes.get(tap)}")
        self.student_taps = tuple(dict.fromkeys(s for _, s in self.pairs))
        self.teacher_taps = tuple(dict.fromkeys(t for t, _ in self.pairs))
        self.regressors = nn.ModuleList(nn.Conv2d(pair.student_shapes[s][0], pair.teacher_shapes[t][0], 1)
                                        for t, s in self.pairs)
        init = float(cfg.get("loss_weight_init", 1.0))
        self.wnet = nn.ModuleList(WeightNetwork(pair.teacher_shapes[t][0]) for t, _ in self.pairs)
        self.lwnet = nn.ModuleList(LossWeightNetwork(pair.teacher_shapes[t][0], init) for t, _ in self.pairs)
        self.lookahead = int(cfg.get("lookahead_steps", 2))
        self.meta_lr = float(cfg.get("meta_lr", 1e-4))
        self.meta_wd = float(cfg.get("meta_wd", 1e-4))
        self.order = str(cfg.get("order", "student_first"))
        if self.order not in ("student_first", "meta_first"):
            raise pair.incompatible(self.method_name, f"order must be student_first or meta_first, got {self.order}")
        self._meta = {"optimizer": None}
        self._student = [pair.student]

    def trainable_parameters(self):
        return self.regressors.parameters()  # the meta-networks have their own optimizer

    def meta_parameters(self):
        return [*self.wnet.parameters(), *self.lwnet.parameters()]

    def matching_loss(self, student, teacher, regressors=None) -> torch.Tensor:
        regressors = self.regressors if regressors is None else regressors
        total = 0.0
        for k, (t, s) in enumerate(self.pairs):
            src = teacher[t]
            total = total + l2t_pair_loss(src, regressors[k](student[s]), self.wnet[k](src), self.lwnet[k](src))
        return total

    def terms(self, batch, student, teacher):
        return {"l2t_match": self.matching_loss(student, teacher)}

    # -- the meta step

    def meta_step(self, batch, teacher, step) -> None:
        """Look-ahead from the current student (SGD with the run optimizer's lr, momentum, its momentum buffers as
        they are, weight decay), the looked-ahead CE differentiated into the meta-networks, one Adam step on them;
        the student, its BN statistics and the optimizer state are left as they were (rollback)."""
        weights = self.term_weights(step.epoch)
        optimizer = step.run.step.optimizer
        group = optimizer.param_groups[0]
        lr, wd = float(group["lr"]), float(group.get("weight_decay", 0.0))
        mu, nesterov = float(group.get("momentum", 0.0)), bool(group.get("nesterov", False))
        target = _Target(self._student[0], self.regressors)
        named = [(n, p) for n, p in target.named_parameters() if p.requires_grad]
        names = [n for n, _ in named]
        theta = {n: p.detach().clone().requires_grad_(True) for n, p in named}
        velocity = {}
        for n, p in named:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            velocity[n] = buf.detach().clone() if buf is not None else None
        buffers = {n: b.clone() for n, b in target.named_buffers()}  # BN statistics of the look-ahead are discarded

        def run(params):
            return functional_call(target, (params, buffers), (batch.inputs, self.student_taps))

        def regs(params):
            return [lambda x, w=params[f"regressors.{k}.weight"], b=params[f"regressors.{k}.bias"]: F.conv2d(x, w, b)
                    for k in range(len(self.regressors))]

        def sgd(params, loss):
            grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True, allow_unused=True)
            out = {}
            for n, g in zip(names, grads):
                if g is None:
                    out[n] = params[n]
                    continue
                d = g + wd * params[n]
                if mu:
                    v = d if velocity[n] is None else mu * velocity[n] + d
                    velocity[n] = v
                    d = d + mu * v if nesterov else v
                out[n] = params[n] - lr * d
            return out

        for _ in range(self.lookahead):
            out = run(theta)
            theta = sgd(theta, weights.get("l2t_match", 1.0) * self.matching_loss(out, teacher, regs(theta)))
        theta = sgd(theta, F.cross_entropy(run(theta)["logits"], batch.targets))
        outer = F.cross_entropy(run(theta)["logits"], batch.targets)
        meta = self.meta_parameters()
        meta_grads = torch.autograd.grad(outer, meta, allow_unused=True)
        if self._meta["optimizer"] is None:
            self._meta["optimizer"] = torch.optim.Adam(meta, lr=self.meta_lr, weight_decay=self.meta_wd)
        meta_optimizer = self._meta["optimizer"]
        meta_optimizer.zero_grad(set_to_none=True)
        for p, g in zip(meta, meta_grads):
            p.grad = g
        meta_optimizer.step()

    def train_step(self, batch, step):
        teacher = step.teacher(batch)
        if self.order == "meta_first":
            self.meta_step(batch, teacher, step)
        with step.autocast():
            student = step.forward(batch.inputs, self.student_taps)
            total, terms = self.loss(batch, student, teacher, step.epoch)
        step.update(self, total, terms)
        if self.order == "student_first":
            self.meta_step(batch, teacher, step)
        return total, terms

    def record_fields(self):
        return {"evaluated_head": "student", "l2t_pairs": [f"{t}-{s}" for t, s in self.pairs],
                "meta_trained": ["weight_networks", "loss_weight_networks"]}
