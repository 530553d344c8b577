"""Li et al. 2023, "Curriculum Temperature for Knowledge Distillation" (AAAI; zhengli97/CTKD).

KD whose temperature is learned adversarially: a temperature module predicts

    T = t_start + t_end * sigmoid(GRL_lambda(theta))                                       (helper/loops.py)

and the student's KD term at that T (`temperature_kd_loss`) is minimised by everything, but the gradient that reaches
the module's parameters passes a gradient-reversal layer (`GradientReversal`: identity forward, backward multiplied
by lambda; models/temp_global.py). lambda follows the cosine curriculum of train_student.py `CosineDecay`:

    lambda(e) = lambda_max + (lambda_min - lambda_max) * (1 - cos(pi * min(e, L) / L)) / 2,   e = 1-indexed epoch,

with the repo's flags --decay_max 0 --decay_min -1 --decay_loops 10: lambda goes 0 -> -1 over the first 10 epochs
(-0.0245 at epoch 1), so the module ascends the KD loss ever harder (easy-to-hard curriculum). The sign flip lives in
lambda, not in the layer.

Modules (option `temperature_module`):
  - global (the repo's, default): one parameter theta initialised to 1.0 (Global_T), T = 1 + 20 sigmoid(1) = 15.62
    at the start. It is a method parameter, so it joins the student's SGD optimizer with the same lr, momentum and
    weight decay, as the repo's trainable_list does.
  - instance (the paper's instance-wise variant, not in the repo): a 2-layer MLP Linear(2C, instance_hidden) - ReLU -
    Linear(instance_hidden, 1) on the detached [teacher, student] logits gives one theta_i per sample; the per-sample
    KD follows the README's KL_Loss (teacher probabilities + 1e-7). The hidden width is our choice (the authors' MLP
    is only in their Drive download).

temperature_kd_loss(z_s, z_t, T, teacher_eps) = mean_i T_i^2 sum_c q_ic (log q_ic - log softmax(z_s/T_i)_ic),
q = softmax(z_t/T) + teacher_eps, teacher detached (distiller_zoo/KD.py DistillKL: batchmean KL * T^2, eps 0).
total = ce * CE + kd * KD(T); the script's -r 0.1 -a 0.9 -b 0. The current T (mean over the batch) is logged as the
weight-0 term `temperature`, so each epoch's mean temperature is in the record's history.

Option `logit_standardization` (LSKD's CTKD+LS, logit-standardization-KD CTKD/distiller_zoo/KD.py
DistillKL_logit_stand): both logits are Z-scored (kdbench.methods.common.standardize_logits) inside the KD term only;
the temperature module still sees raw logits. (That repo's train_student.py picks the standardised loss when
--logit_stand is NOT given -- its flag is inverted -- and its script runs without the flag with -r 0.1 -a 9.)

As a plug-in for other methods: hold a `CurriculumTemperature` and call it with (z_s, z_t, epoch) for the T of any
temperature-based loss (the repo does so for DKD: distiller_zoo/DKD.py with -r 1 -a 0 -b 1 --dkd_alpha 1
--dkd_beta 2); the module, being a submodule, joins the optimizer by itself.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.methods.common import standardize_logits


class GradientReversal(torch.autograd.Function):
    """Identity in the forward pass; the backward pass multiplies the incoming gradient by `lambda_` (CTKD's
    GradientReversalFunction: no sign flip of its own)."""

    @staticmethod
    def forward(ctx, x, lambda_: float):
        ctx.lambda_ = float(lambda_)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.lambda_, None


def reverse_gradient(x: torch.Tensor, lambda_: float) -> torch.Tensor:
    return GradientReversal.apply(x, lambda_)


def cosine_lambda(epoch: int, lambda_max: float = 0.0, lambda_min: float = -1.0, loops: float = 10.0) -> float:
    """CTKD's CosineDecay.get_value(epoch): ((cos(pi * clamp(e, 0, L) / L) + 1) / 2) * (max - min) + min."""
    e = min(max(float(epoch), 0.0), float(loops))
    return (math.cos(e * math.pi / loops) + 1.0) * 0.5 * (lambda_max - lambda_min) + lambda_min


def temperature_kd_loss(z_s: torch.Tensor, z_t: torch.Tensor, temperature: torch.Tensor,
                        teacher_eps: float = 0.0) -> torch.Tensor:
    """mean_i T_i^2 * sum_c q_ic (log q_ic - log_softmax(z_s/T_i)_ic), q = softmax(z_t/T) + teacher_eps.

    `temperature` is a scalar, a (1,) tensor (one global T) or an (N,) tensor (one T per sample); it is NOT detached
    (the temperature module learns through it). The teacher logits are detached. With teacher_eps 0 and one T this
    is CTKD's DistillKL (batchmean KL * T^2); the instance-wise README KL_Loss adds 1e-7 to the teacher probabilities.
    """
    t = torch.as_tensor(temperature, dtype=z_s.dtype, device=z_s.device).reshape(-1, 1)  # (1, 1) or (N, 1)
    log_p_s = F.log_softmax(z_s / t, dim=1)
    q = F.softmax(z_t.detach() / t, dim=1) + teacher_eps
    per_sample = (q * (torch.log(q) - log_p_s)).sum(1) * t.reshape(-1) ** 2
    return per_sample.mean()


class GlobalTemperature(nn.Module):
    """CTKD's Global_T: one parameter, initialised to `init`, returned through the gradient-reversal layer."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.theta = nn.Parameter(torch.full((1,), float(init)))

    def forward(self, z_s, z_t, lambda_: float) -> torch.Tensor:
        return reverse_gradient(self.theta, lambda_)  # (1,)


class InstanceTemperature(nn.Module):
    """The paper's instance-wise module: MLP(2C -> hidden -> 1) on the detached [teacher, student] logits, output
    through the gradient-reversal layer: one theta per sample."""

    def __init__(self, num_classes: int, hidden: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, z_s, z_t, lambda_: float) -> torch.Tensor:
        x = torch.cat([z_t.detach(), z_s.detach()], dim=1)
        return reverse_gradient(self.mlp(x).squeeze(1), lambda_)  # (N,)


class CurriculumTemperature(nn.Module):
    """T = t_start + t_end * sigmoid(module(z_s, z_t, lambda(epoch))), lambda from the cosine curriculum.

    A plug-in: any method holding one gets a learnable, adversarially scheduled temperature for its own loss."""

    def __init__(self, kind: str = "global", num_classes: int = 100, t_start: float = 1.0, t_end: float = 20.0,
                 lambda_max: float = 0.0, lambda_min: float = -1.0, lambda_loops: float = 10.0, init: float = 1.0,
                 instance_hidden: int = 256):
        super().__init__()
        if kind == "global":
            self.module = GlobalTemperature(init)
        elif kind == "instance":
            self.module = InstanceTemperature(num_classes, instance_hidden)
        else:
            raise ValueError(f"ctkd temperature_module must be 'global' or 'instance', got '{kind}'")
        self.kind = kind
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.lambda_max, self.lambda_min, self.lambda_loops = float(lambda_max), float(lambda_min), float(lambda_loops)

    def reversal(self, epoch: int) -> float:
        return cosine_lambda(epoch, self.lambda_max, self.lambda_min, self.lambda_loops)

    def forward(self, z_s: torch.Tensor, z_t: torch.Tensor, epoch: int) -> torch.Tensor:
        theta = self.module(z_s, z_t, self.reversal(epoch))
        return self.t_start + self.t_end * torch.sigmoid(theta)


@register_method("ctkd")
class CTKD(Method):
    """KD at CTKD's learnable temperature: terms `kd` (at T) and `temperature` (mean T, logged with weight 0)."""
    paper = "Li et al., Curriculum Temperature for Knowledge Distillation, AAAI 2023"
    code = "zhengli97/CTKD models/temp_global.py"

    teacher_taps = ("logits",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.temperature_module = CurriculumTemperature(
            str(cfg.get("temperature_module", "global")), pair.num_classes, cfg.get("t_start", 1.0),
            cfg.get("t_end", 20.0), cfg.get("lambda_max", 0.0), cfg.get("lambda_min", -1.0),
            cfg.get("lambda_loops", 10), cfg.get("init", 1.0), int(cfg.get("instance_hidden", 256)))
        eps = cfg.get("teacher_eps")  # None: the repo's choice for the module (instance 1e-7, global 0)
        self.teacher_eps = float(eps) if eps is not None else (1e-7 if self.temperature_module.kind == "instance" else 0.0)
        self.logit_standardization = bool(cfg.get("logit_standardization", False))
        self.epoch = 1  # the epoch of the current loss() call: it sets the gradient-reversal strength

    def loss(self, batch, student, teacher, epoch):
        self.epoch = epoch
        return super().loss(batch, student, teacher, epoch)

    def terms(self, batch, student, teacher):
        z_s, z_t = student["logits"], teacher["logits"].detach()
        temperature = self.temperature_module(z_s, z_t, self.epoch)
        if self.logit_standardization:
            z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
        return {"kd": temperature_kd_loss(z_s, z_t, temperature, self.teacher_eps),
                "temperature": temperature.detach().mean()}
