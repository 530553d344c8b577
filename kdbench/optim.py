"""How parameters move: optimizers (SGD, Adam, DOT), LR schedules, and the step policy the loop calls once per batch.

DOT (Zhao et al. ICCV 2023, mdistiller's "distillation-oriented trainer") keeps two momentum buffers per parameter:
one for the task gradient, one for the distillation gradient (every other loss term), with momenta mu - delta and
mu + delta. It needs the two gradients separately, so its step policy asks the method for the weighted task part
of the loss (Method.task_loss: the CE term) and calls `DOT.backward_step(distill_loss, task_loss)`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from kdbench.config import OptimConfig, ScheduleConfig
from kdbench.distributed import SINGLE, World, average_gradients
from kdbench.errors import KDBenchError


class DOT(torch.optim.Optimizer):
    """Per reference/methods.md section 2.18 (mdistiller's DOT):

    task branch (parameters with a CE gradient g): d = g + wd*theta; buf = d on the first step, else
        buf = m*buf + d with m = mu - delta if the parameter also has a distillation gradient, else mu;
        theta -= lr*buf.
    distillation branch (parameters with a distillation gradient k): buf = k on the first step; then
        buf = (mu + delta)*buf + k if the parameter also has a CE gradient (no weight decay), else
        buf = mu*buf + (k + wd*theta); theta -= lr*buf.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, delta: float = 0.075, weight_decay: float = 5e-4):
        super().__init__(params, dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay))

    def backward_step(self, distill_loss: torch.Tensor, task_loss: torch.Tensor, reduce=None) -> None:
        """Both backward passes, each gradient reduced (`reduce`: averaged over the ranks of a distributed job)."""
        params = [p for group in self.param_groups for p in group["params"]]
        distill_grads = {}
        if isinstance(distill_loss, torch.Tensor) and distill_loss.requires_grad:
            distill_loss.backward(retain_graph=True)
            distill_grads = {p: p.grad.detach().clone() for p in params if p.grad is not None}
            if reduce is not None:
                reduce(list(distill_grads.values()))
            self.zero_grad(set_to_none=True)
        task_loss.backward()
        if reduce is not None:
            reduce([p.grad for p in params if p.grad is not None])
        self.step(distill_grads)

    @torch.no_grad()
    def step(self, distill_grads: dict | None = None):  # noqa: D102  (signature differs: see class docstring)
        distill_grads = distill_grads or {}
        for group in self.param_groups:
            lr, mu, delta, wd = group["lr"], group["momentum"], group["delta"], group["weight_decay"]
            for p in group["params"]:
                state = self.state[p]
                g, k = p.grad, distill_grads.get(p)
                if g is not None:
                    d = g + wd * p
                    buf = state.get("task_buf")
                    state["task_buf"] = d.clone() if buf is None else buf.mul_(mu - delta if k is not None else mu).add_(d)
                    p.sub_(lr * state["task_buf"])
                if k is not None:
                    buf = state.get("distill_buf")
                    if buf is None:
                        state["distill_buf"] = k.clone()
                    elif g is not None:
                        buf.mul_(mu + delta).add_(k)
                    else:
                        buf.mul_(mu).add_(k + wd * p)
                    p.sub_(lr * state["distill_buf"])


def build_optimizer(params, optim: OptimConfig) -> torch.optim.Optimizer:
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov,
                               weight_decay=optim.weight_decay)
    if optim.name == "adam":
        return torch.optim.Adam(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    if optim.name == "dot":
        return DOT(params, lr=optim.lr, momentum=optim.momentum, delta=optim.delta, weight_decay=optim.weight_decay)
    raise KDBenchError(f"unknown optimizer '{optim.name}'; use optim=sgd, adam or dot")


@torch.no_grad()
def apply_max_norm(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Hinton et al. 2012's weight constraint: rescale each unit's incoming weight vector to L2 norm <= max_norm
    after every update (every parameter with >= 2 dims, one row per output unit; biases are left alone)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.dim() >= 2:
                norms = p.flatten(1).norm(dim=1).clamp_min(1e-12)
                p.mul_((max_norm / norms).clamp(max=1.0).view(-1, *[1] * (p.dim() - 1)))


class StepPolicy:
    """One update from a batch's loss: zero the gradients, backward, (in a distributed job) average the gradients
    over the ranks, optimizer step, then the weight constraint (max-norm) if any. `separates_task` policies (DOT)
    also get the loss's weighted task part. `share` is the batch's part of the global batch.

    With a gradient scaler (trainer.precision=fp16, torch.amp.GradScaler): backward of scale * loss, then
    scaler.step unscales the gradients and skips the step when one is inf/NaN, and scaler.update adapts the scale
    (halved after a skipped step, doubled after 2000 clean ones). The step taken equals the unscaled one."""

    separates_task = False

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: Optional[float] = None, scaler=None,
                 world: World = SINGLE):
        self.optimizer = optimizer
        self.max_norm = max_norm
        self.scaler = scaler
        self.world = world

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the policy: the optimizer's state and, under fp16, the gradient scaler's (its
        current scale and clean-step count: a resumed run must skip and rescale exactly as an uninterrupted one)."""
        return {"optimizer": self.optimizer.state_dict(),
                "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, total: torch.Tensor, task: Optional[torch.Tensor] = None, share: float = 1.0) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._update(total, task, share)
        if self.max_norm:
            apply_max_norm(self.optimizer, self.max_norm)

    def _reduce(self, share: float):
        return (lambda grads: average_gradients(grads, share, self.world)) if self.world.distributed else None

    def _grads(self):
        return [p.grad for g in self.optimizer.param_groups for p in g["params"]]

    def _update(self, total, task, share) -> None:
        if self.scaler is None:
            total.backward()
            if self.world.distributed:
                self._reduce(share)(self._grads())
            self.optimizer.step()
            return
        self.scaler.scale(total).backward()
        if self.world.distributed:  # scaled gradients averaged: the scale is the same on every rank
            self._reduce(share)(self._grads())
        self.scaler.step(self.optimizer)
        self.scaler.update()


class DOTStep(StepPolicy):
    separates_task = True

    def _update(self, total, task, share) -> None:
        if task is None:
            raise KDBenchError("optim=dot separates the task (CE) gradient from the distillation gradient; give the "
                               "method a non-zero method.weights.ce or use optim=sgd")
        self.optimizer.backward_step(total - task, task, self._reduce(share))


def grad_scaler(params, precision: str = "fp32"):
    """A gradient scaler for fp16 autocast (on the parameters' device), None for fp32 and bf16 (bf16 has fp32's
    exponent range: gradients do not underflow)."""
    if str(getattr(precision, "value", precision)) != "fp16":
        return None
    params = list(params)
    device = params[0].device.type if params else "cpu"
    return torch.amp.GradScaler(device)


def build_step(params, optim: OptimConfig, precision: str = "fp32", world: World = SINGLE) -> StepPolicy:
    params = list(params)
    optimizer = build_optimizer(params, optim)
    scaler = grad_scaler(params, precision)
    if isinstance(optimizer, DOT):
        if scaler is not None:
            raise KDBenchError("optim=dot takes two backward passes per step, which the fp16 gradient scaler does not "
                               "cover; use trainer.precision=bf16 or fp32 with optim=dot")
        return DOTStep(optimizer, optim.max_norm, world=world)
    return StepPolicy(optimizer, optim.max_norm, scaler, world)


def constant_sgd_step(params, lr: float, momentum: float, weight_decay: float, precision: str = "fp32",
                      world: World = SINGLE) -> StepPolicy:
    """The pre-training stages' policy (RepDistiller's init stage): plain SGD at a constant LR."""
    params = list(params)
    return StepPolicy(torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay), None,
                      grad_scaler(params, precision), world)


def lr_at(epoch: int, base_lr: float, schedule: ScheduleConfig, epochs: int) -> float:
    """LR for 1-indexed `epoch`, set once per epoch. step: the CRD rule lr0 * gamma^#{m : epoch > m}."""
    if schedule.name == "step":
        return base_lr * schedule.gamma ** sum(epoch > m for m in schedule.milestones)
    if schedule.name == "cosine":
        return schedule.min_lr + (base_lr - schedule.min_lr) * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))
    if schedule.name == "constant":
        return base_lr
    raise KDBenchError(f"unknown schedule '{schedule.name}'; use step, cosine or constant")
