"""Shen, Wang, Yin, Song, Luo & Song (AAAI 2021), "Progressive Network Grafting for Few-Shot Knowledge Distillation"
(NetGraft; zju-vipa/NetGraft `graft_block.py`, `graft_net.py`, `utils/parser_cifar100.py`, `network/vgg_block.py`).

The student is the teacher with its last blocks replaced by thinner ones (the code: VGG-16 whose blocks 3 and 4 have
256 channels, `vgg16_graft` here); the blocks before them are copied from the teacher and never trained. Only a few
unlabeled samples per class are used (dataset.samples_per_class; labels are never read). Let the grafted units be
the student's blocks from `graft_from` on plus its classifier (the code: blocks 3, 4 and the classifier), each
wrapped with 1x1 conv adapters (with bias, kaiming fan-out init): t2s (teacher width -> student width) before every
unit but the first, s2t (student -> teacher width) after every unit but the last.

  block grafting  for unit u in order: the teacher with its unit u replaced by the wrapped student unit, trained for
                  block_epochs[u] with Adam (unit lr lrs_student[u], adapters lrs_adapter) on
                  graft = sum_{n,c} (normalize(z_graft) - normalize(z_t))^2   (L2-normalised logits; the code's
                  norm_loss, MSE with reduction 'sum')
  net grafting    for k = 1 .. U-1: the wrapped units 0..k together replace the teacher's, trained for net_epochs[k-1]
                  with Adam at lr_net (every unit and adapter in the scion), same loss
The final student: the copied blocks, then the wrapped units in order (adapters kept between them). The run is
evaluated on that network (eval_logits); the adapters are the method's (extra_params), the blocks the student's.
The code's learning rates scale with the shots (factor = shots / 10; its batch is 64 * factor): lrs_student
[0.00025, 0.001, 0.001], lrs_adapter 0.001, lr_net 1e-4 (not scaled), epochs [1000, 200, 200] + [150, 150].
kdbench maps these phases onto the run's epochs proportionally (trainer.epochs = 1700 reproduces them; fewer epochs
shorten every phase alike), owns its updates (Adam per phase; the run's optimizer never steps) and keeps the Adam
state out of the checkpoint (a resumed run restarts the current phase's moments). Supported nets: kdbench's VGGs
(block0..block4, the code's architecture, with BatchNorm here: the code's VGG has none) of equal depth whose copied
blocks have the teacher's shapes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.models.vgg import VGG

N_BLOCKS = 5


def vgg_block(model: VGG, i: int, x: torch.Tensor, size: int) -> torch.Tensor:
    """Block i of a kdbench VGG with its ReLU and the pooling that follows it (`size` = the input height)."""
    x = F.relu(getattr(model, f"block{i}")(x))
    if i < 3 or (i == 3 and size == 64):
        x = getattr(model, f"pool{i}")(x)
    return x


def vgg_head(model: VGG, x: torch.Tensor) -> torch.Tensor:
    return model.classifier(model.pool4(x).flatten(1))


def normalized_logit_mse(z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """sum over samples and classes of (z_s / ||z_s|| - z_t / ||z_t||)^2 (the code's norm_loss)."""
    return F.mse_loss(F.normalize(z_s, dim=1), F.normalize(z_t.detach(), dim=1), reduction="sum")


def phase_bounds(lengths, total_epochs: int) -> list[int]:
    """Cumulative last epochs of phases of `lengths`, scaled to total_epochs (rounded; the last ends at the total);
    every phase keeps at least one epoch when there are as many epochs as phases."""
    total = float(sum(lengths))
    bounds, acc = [], 0.0
    for n in lengths:
        acc += n
        bounds.append(int(round(acc / total * total_epochs)))
    bounds[-1] = total_epochs
    if total_epochs >= len(bounds):
        for i in range(1, len(bounds)):
            bounds[i] = max(bounds[i], bounds[i - 1] + 1)
        for i in range(len(bounds) - 1, -1, -1):
            bounds[i] = min(bounds[i], total_epochs - (len(bounds) - 1 - i))
    return bounds


def _adapter(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, kernel_size=1)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(conv.bias)
    return conv


@register_method("netgraft")
class NetGraft(Method):
    paper = "Shen et al., Progressive Network Grafting for Few-Shot Knowledge Distillation, AAAI 2021"
    code = "zju-vipa/NetGraft"
    teacher_taps = ("logits",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        if pair.teacher is None:
            raise pair.incompatible(self.method_name, "it needs a teacher")
        if not isinstance(pair.student, VGG) or not isinstance(pair.teacher, VGG):
            raise pair.incompatible(self.method_name, "it grafts blocks of kdbench's VGGs (block0..block4) only")
        self.graft_from = int(cfg.get("graft_from", 3))
        if not 1 <= self.graft_from < N_BLOCKS:
            raise pair.incompatible(self.method_name, f"graft_from must be 1..{N_BLOCKS - 1}, got {self.graft_from}")
        t, s = pair.teacher, pair.student
        for i in range(self.graft_from):
            ts, ss = getattr(t, f"block{i}").state_dict(), getattr(s, f"block{i}").state_dict()
            if ts.keys() != ss.keys() or any(ts[k].shape != ss[k].shape for k in ts):
                raise pair.incompatible(self.method_name, f"the student's block{i} is copied from the teacher, but "
                                                          f"their shapes differ")
        with torch.no_grad():
            for i in range(self.graft_from):
                getattr(s, f"block{i}").load_state_dict(getattr(t, f"block{i}").state_dict())
        self.units = list(range(self.graft_from, N_BLOCKS)) + ["head"]
        n = len(self.units)
        w_t = [getattr(t, f"block{i}")[-1].num_features for i in range(self.graft_from, N_BLOCKS)]
        w_s = [getattr(s, f"block{i}")[-1].num_features for i in range(self.graft_from, N_BLOCKS)]
        self.s2t = nn.ModuleList(_adapter(w_s[u], w_t[u]) for u in range(n - 1))
        self.t2s = nn.ModuleList(_adapter(w_t[u], w_s[u]) for u in range(n - 1))  # t2s[u] precedes unit u + 1
        self._nets = [t, s]  # plain list: not submodules
        shots = cfg.get("shots")
        factor = (float(shots) if shots is not None else 10.0) / 10.0
        self.lrs_student = [float(v) * factor for v in cfg.get("lrs_student", [0.00025, 0.001, 0.001])]
        self.lr_adapter = float(cfg.get("lr_adapter", 0.001)) * factor
        self.lr_net = float(cfg.get("lr_net", 1e-4))
        self.block_epochs = [int(v) for v in cfg.get("block_epochs", [1000, 200, 200])]
        self.net_epochs = [int(v) for v in cfg.get("net_epochs", [150, 150])]
        if len(self.lrs_student) != n or len(self.block_epochs) != n or len(self.net_epochs) != n - 1:
            raise pair.incompatible(self.method_name, f"{n} grafted units need {n} lrs_student and block_epochs "
                                                      f"and {n - 1} net_epochs")
        self.phases = [("block", u) for u in range(n)] + [("net", k) for k in range(1, n)]
        self.bounds = phase_bounds(self.block_epochs + self.net_epochs, int(pair.epochs))
        self._optim = {"phase": None, "optimizer": None}
        self.input_size = int(pair.input_shape[1]) if len(pair.input_shape) == 3 else 32

    def trainable_parameters(self):
        return []  # NetGraft owns its updates (Adam per phase)

    # -- the grafted networks

    def unit_forward(self, u: int, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Student unit u wrapped with its adapters (t2s before unless u is the scion's first unit of the whole
        chain, s2t after unless it is the last)."""
        student = self._nets[1]
        if u > 0 and u == first:
            x = self.t2s[u - 1](x)
        if self.units[u] == "head":
            return vgg_head(student, x)
        x = vgg_block(student, self.units[u], x, self.input_size)
        if u < len(self.units) - 1:
            x = self.s2t[u](x)
            if u < last:
                x = self.t2s[u](x)
        return x

    def grafted_logits(self, inputs: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """The teacher with its units first..last replaced by the wrapped student units."""
        teacher = self._nets[0]
        x = inputs
        for i in range(self.graft_from):
            x = vgg_block(teacher, i, x, self.input_size)
        for u, unit in enumerate(self.units):
            if first <= u <= last:
                x = self.unit_forward(u, x, first, last)
            elif unit == "head":
                return vgg_head(teacher, x)
            else:
                x = vgg_block(teacher, unit, x, self.input_size)
        return x

    def student_logits(self, student: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The grafted student: its copied blocks, then every wrapped unit with the adapters between them."""
        x = inputs
        for i in range(self.graft_from):
            x = vgg_block(student, i, x, self.input_size)
        for u in range(len(self.units)):
            x = self.unit_forward(u, x, 0, len(self.units) - 1)
        return x

    def eval_logits(self, student, inputs):
        return self.student_logits(student, inputs)

    # -- phases

    def phase_at(self, epoch: int):
        for phase, end in zip(self.phases, self.bounds):
            if epoch <= end:
                return phase
        return self.phases[-1]

    def _unit_parameters(self, u: int) -> list[nn.Parameter]:
        student = self._nets[1]
        unit = self.units[u]
        return list(student.classifier.parameters()) if unit == "head" else list(getattr(student, f"block{unit}").parameters())

    def optimizer_for(self, phase):
        if self._optim["phase"] != phase:
            kind, k = phase
            if kind == "block":
                adapters = ([*self.t2s[k - 1].parameters()] if k > 0 else []) + \
                    ([*self.s2t[k].parameters()] if k < len(self.units) - 1 else [])
                groups = [{"params": self._unit_parameters(k), "lr": self.lrs_student[k]},
                          {"params": adapters, "lr": self.lr_adapter}]
            else:
                params = [p for u in range(k + 1) for p in self._unit_parameters(u)]
                params += [p for u in range(k) for p in (*self.s2t[u].parameters(), *self.t2s[u].parameters())]
                groups = [{"params": params, "lr": self.lr_net}]
            self._optim.update(phase=phase, optimizer=torch.optim.Adam([g for g in groups if g["params"]]))
        return self._optim["optimizer"]

    def scion(self, phase) -> tuple[int, int]:
        kind, k = phase
        return (k, k) if kind == "block" else (0, k)

    def forward_loss(self, batch, step):
        first, last = self.scion(self.phase_at(step.epoch))
        teacher = step.teacher(batch)
        z = self.grafted_logits(batch.inputs, first, last)
        return self.loss(batch, {"logits": z}, teacher, step.epoch)

    def terms(self, batch, student, teacher):
        return {"graft": normalized_logit_mse(student["logits"], teacher["logits"])}

    def train_step(self, batch, step):
        optimizer = self.optimizer_for(self.phase_at(step.epoch))
        with step.autocast():
            total, terms = self.forward_loss(batch, step)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return total, terms

    def record_fields(self):
        return {"evaluated_head": "grafted student (copied blocks + grafted units with their adapters)",
                "netgraft_units": [str(u) for u in self.units], "netgraft_phase_end_epochs": self.bounds,
                "labels_used": False}
