"""Phuong & Lampert, ICCV 2019, "Distillation-Based Training for Multi-Exit Architectures". Reference code:
mary-phuong/multiexit-distillation (`main.py` DistillationBasedLoss, DistillationLossConstTemp, ClassificationOnlyLoss,
MsdNet.Exit and init_weights; `train_cifar.py` for the settings). No pre-trained teacher: needs_teacher = False.

Exits. The reference trains an 11-exit MSDNet, which kdbench's zoo does not have; here every student stage but the
last (`exits`: null) gets an early exit, a method module shaped as the reference's MSDNet exit: ConvBnReLU(C -> W,
3x3, stride 2, pad 1), ConvBnReLU(W -> W, 3x3, stride 2, pad 1), average pooling, Linear(W -> K), W = `exit_width`
(128; null = C), convs with bias, initialised as MsdNet.init_weights (conv N(0, sqrt(2 / (9 W))), biases 0, BN 1/0,
Linear bias 0). The reference pools with AvgPool2d(2) on MSDNet's 2x2 maps; kdbench pools globally, so any stage
size works. The last exit is the student's own classifier.

Loss (DistillationBasedLoss), exits e = 1..E, z_L the last exit's logits, p_t = softmax(z_L / T) detached:
  ce       CE(z_L, y)                                                        (the base class's)
  exit_ce  sum_e CE(z_e, y)
  exit_kd  sum_e T^2 * (1/N) sum_n -sum_c p_t[n, c] log softmax(z_e / T)[n, c]     (a cross-entropy with soft targets,
           as the code: it differs from KL(p_t || q_e) by the teacher's entropy, which has no gradient)
  temperature  T itself, logged with weight 0
  total = global_scale * ((1 - C) ce + (1 - C) exit_ce + C exit_kd),  C = 0.5: weights ce, exit_ce, exit_kd 0.5 and
  `global_scale` null = the code's 2 * 5 / n_exits with n_exits = E + 1 classifiers (train_cifar.py); the scale
  multiplies every weight in term_weights.
Temperature annealing (`anneal` true): T starts at `temperature` (1.0); after every training step, if the batch mean
of max_c softmax(z_L / T) (at the T the step used) exceeds `max_prob` (0.5), T <- T * `anneal_factor` (1.05). T is a
buffer of the method (checkpointed, so a resumed run continues from it; the reference's T is a Python attribute).
`anneal: false` keeps T fixed: DistillationLossConstTemp is method.anneal=false method.temperature=4.
The reference's CE-only baseline (ClassificationOnlyLoss: the unscaled sum of every exit's CE) is conf/method/
multi_exit_ce.yaml.

Evaluation: the run's own number is the last exit (the student); each early exit is a leaderboard row of its own
(method multi_exit@exit1, ...).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError
from kdbench.models import count_parameters

# ----------------------------------------------------------------------------- plain functions


def multi_exit_ce_loss(exit_logits: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """sum_e mean_n CE(z_e[n], y[n])."""
    return sum(F.cross_entropy(z, targets) for z in exit_logits)


def multi_exit_kd_loss(exit_logits: Sequence[torch.Tensor], final_logits: torch.Tensor, temperature) -> torch.Tensor:
    """sum_e T^2 * (1/N) sum_n -sum_c softmax(z_L / T)[n, c] * log softmax(z_e / T)[n, c], z_L detached;
    `temperature` a float or a 0-d tensor."""
    wide = lambda x: x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # noqa: E731
    p_t = F.softmax(wide(final_logits.detach()) / temperature, dim=1)
    return sum(-(p_t * F.log_softmax(wide(z) / temperature, dim=1)).sum(1).mean() for z in exit_logits) * temperature**2


def annealed_temperature(final_logits: torch.Tensor, temperature: torch.Tensor, max_prob: float = 0.5,
                         factor: float = 1.05) -> torch.Tensor:
    """The next step's T: T * factor if mean_n max_c softmax(z_L / T)[n, c] > max_prob, else T (no host sync)."""
    with torch.no_grad():
        adj = F.softmax(final_logits.detach().float() / temperature, dim=1).max(dim=1).values.mean()
        return torch.where(adj > max_prob, temperature * factor, temperature)


# ----------------------------------------------------------------------------- exits


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    """MSDNet's ConvBnRelu2d(c_in, c_out, 3, stride 2, padding 1) (the conv has a bias)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1), nn.BatchNorm2d(c_out), nn.ReLU())


class MultiExitHead(nn.Module):
    """The reference's MSDNet exit with a global pool: (N, C, H, W) -> (N, K)."""

    def __init__(self, c_in: int, num_classes: int, width: Optional[int] = 128):
        super().__init__()
        width = int(width or c_in)
        self.body = nn.Sequential(conv_bn_relu(c_in, width), conv_bn_relu(width, width), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(1))
        self.fc = nn.Linear(width, num_classes)
        for m in self.modules():  # MsdNet.init_weights
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(f))


# ----------------------------------------------------------------------------- the method


@register_method("multi_exit")
class MultiExit(Method):
    paper = "Phuong & Lampert, Distillation-Based Training for Multi-Exit Architectures, ICCV 2019"
    code = "mary-phuong/multiexit-distillation"
    needs_teacher = False

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        name = self.method_name
        self.anneal = bool(cfg.get("anneal", True))
        self.max_prob = float(cfg.get("max_prob", 0.5))
        self.anneal_factor = float(cfg.get("anneal_factor", 1.05))
        t0 = float(cfg.get("temperature", 1.0))
        if t0 <= 0 or self.anneal_factor <= 0:
            raise KDBenchError(f"multi_exit: method.temperature and method.anneal_factor must be > 0, got {t0} and "
                               f"{self.anneal_factor}")
        self.register_buffer("temperature", torch.tensor(t0))
        stages = tuple(pair.student.stage_names)
        exits = cfg.get("exits")
        self.exit_taps = tuple(stages[:-1]) if exits is None else tuple(str(e) for e in exits)
        if not self.exit_taps:
            raise pair.incompatible(name, f"{pair.student_name} has {len(stages)} stage(s) {list(stages)}: no stage "
                                          f"before the last to put an exit on")
        heads = []
        for tap in self.exit_taps:
            shape = tuple(pair.student_shapes.get(tap, ()))
            if len(shape) != 3:
                raise pair.incompatible(name, f"an exit needs a (C, H, W) map, {pair.student_name}'s {tap} is "
                                              f"{shape or 'no tap'}")
            heads.append(MultiExitHead(shape[0], pair.num_classes, cfg.get("exit_width", 128)))
        self.exits = nn.ModuleList(heads)
        self.student_taps = self.exit_taps
        scale = cfg.get("global_scale")
        self.n_classifiers = len(self.exits) + 1
        self.global_scale = 2.0 * 5 / self.n_classifiers if scale is None else float(scale)

    def exit_logits(self, student) -> list[torch.Tensor]:
        return [head(student[tap]) for head, tap in zip(self.exits, self.exit_taps)]

    def terms(self, batch, student, teacher):
        t = self.temperature.clone()  # the step's T (the buffer may move after the step)
        logits = self.exit_logits(student)
        return {"exit_ce": multi_exit_ce_loss(logits, batch.targets),
                "exit_kd": multi_exit_kd_loss(logits, student["logits"], t),
                "temperature": t}

    def term_weights(self, epoch):
        return {k: v * self.global_scale for k, v in self.weights.items()}

    def forward_loss(self, batch, step):
        student = step.forward(batch.inputs, self.student_taps)
        total, terms = self.loss(batch, student, None, step.epoch)
        if self.anneal:
            self.temperature.copy_(annealed_temperature(student["logits"], self.temperature, self.max_prob,
                                                        self.anneal_factor))
        return total, terms

    def _exit(self, i: int):
        tap, head = self.exit_taps[i], self.exits[i]
        return lambda student, inputs: head(student.forward_taps(inputs, (tap,))[tap])

    def extra_heads(self):
        return {f"exit{i + 1}": self._exit(i) for i in range(len(self.exits))}

    def record_fields(self):
        return {"evaluated_head": "the last exit (the student's own classifier)",
                "exits": {f"exit{i + 1}": tap for i, tap in enumerate(self.exit_taps)},
                "exit_params": {f"exit{i + 1}": count_parameters(h) for i, h in enumerate(self.exits)},
                "global_scale": self.global_scale}
