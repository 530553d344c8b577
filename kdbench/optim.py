"""Optimizers: SGD, Adam, and DOT (Zhao et al. ICCV 2023, mdistiller's "distillation-oriented trainer").

DOT keeps two momentum buffers per parameter: one for the task (CE) gradient, one for the distillation gradient
(every other loss term), with momenta mu - delta and mu + delta. It needs the two gradients separately, so the
training step calls `backward_step(distill_loss, task_loss)` instead of `backward(); step()`.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig

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

    def backward_step(self, distill_loss: torch.Tensor, task_loss: torch.Tensor) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        distill_grads = {}
        if isinstance(distill_loss, torch.Tensor) and distill_loss.requires_grad:
            distill_loss.backward(retain_graph=True)
            distill_grads = {p: p.grad.detach().clone() for p in params if p.grad is not None}
            self.zero_grad(set_to_none=True)
        task_loss.backward()
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


def build_optimizer(params, optim: DictConfig) -> torch.optim.Optimizer:
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov,
                               weight_decay=optim.weight_decay)
    if optim.name == "adam":
        return torch.optim.Adam(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    if optim.name == "dot":
        return DOT(params, lr=optim.lr, momentum=optim.momentum, delta=optim.delta, weight_decay=optim.weight_decay)
    raise KDBenchError(f"unknown optimizer '{optim.name}'; use optim=sgd, adam or dot")


def backward_step(optimizer: torch.optim.Optimizer, total: torch.Tensor, task: torch.Tensor | None) -> None:
    """One update from a loss whose `task` part (weighted CE, None if absent) DOT treats separately."""
    if isinstance(optimizer, DOT):
        if task is None:
            raise KDBenchError("optim=dot separates the CE gradient from the distillation gradient; give the method "
                               "a non-zero method.weights.ce or use optim=sgd")
        optimizer.backward_step(total - task, task)
    else:
        total.backward()
        optimizer.step()


@torch.no_grad()
def apply_max_norm(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Hinton et al. 2012's weight constraint: rescale each unit's incoming weight vector to L2 norm <= max_norm
    after every update (every parameter with >= 2 dims, one row per output unit; biases are left alone)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.dim() >= 2:
                norms = p.flatten(1).norm(dim=1).clamp_min(1e-12)
                p.mul_((max_norm / norms).clamp(max=1.0).view(-1, *[1] * (p.dim() - 1)))
