"""Shared by the data-free method tests: a real step context (the run's SGD policy over the student) and the
tiny option sets that make a data-free job run in seconds on synthetic CIFAR-shaped data."""
from __future__ import annotations

import torch

from kdbench.optim import StepPolicy
from kdbench.teachers import TeacherOutputs
from kdbench.train import Run, StepContext

# options that shrink each data-free method to a few small steps (method -> overrides)
TINY = {
    "dafl": ["method.batch_size=8", "method.iterations=2", "method.latent_dim=16", "method.generator_width=8"],
    "dfad": ["method.batch_size=8", "method.iterations=2", "method.latent_dim=16", "method.generator_width=8",
             "method.student_steps=2"],
    "zskt": ["method.batch_size=8", "method.iterations=2", "method.latent_dim=16", "method.generator_width=8",
             "method.student_steps=2"],
    "deepinversion": ["method.batch_size=8", "method.iterations=3", "method.synthesis_batch_size=8",
                      "method.synthesis_iterations=2", "method.pool_batches=2", "method.initial_batches=1",
                      "method.synthesis_every=2"],
    "adi": ["method.batch_size=8", "method.iterations=3", "method.synthesis_batch_size=8",
            "method.synthesis_iterations=2", "method.pool_batches=2", "method.synthesis_every=2"],
}




def real_step(pair, method, lr: float = 0.1, epoch: int = 1) -> StepContext:
    """A StepContext whose update is one plain SGD step (no momentum, no weight decay) over the student, with the
    teacher in the mode the loop sets at the start of an epoch and every module in train mode."""
    policy = StepPolicy(torch.optim.SGD(pair.student.parameters(), lr=lr))
    outputs = TeacherOutputs(pair.teacher, method.teacher_taps, method.teacher_train_mode)
    outputs.start_epoch()
    pair.student.train()
    method.train()
    return StepContext(Run(pair.student, method, outputs, None, policy, 0), epoch, torch.device("cpu"))


def params(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def assert_params_equal(module, expected, rtol=1e-5, atol=1e-6):
    for got, want in zip(module.parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=rtol, atol=atol)


def assert_moved(module, before):
    assert any(not torch.equal(p.detach(), b) for p, b in zip(module.parameters(), before, strict=True))


def assert_adam_step_equal(module, twin, tiny: float = 1e-5):
    """`module`'s parameters equal `twin`'s after both took Adam's first step (twin's gradients still in .grad).
    That step moves a weight by about lr * g / (|g| + 1e-8): where |g| is tiny, float rounding alone flips it (the
    biases in front of a BatchNorm have a gradient of exactly 0 up to rounding), so weights whose gradient is below
    `tiny` are left out; they are few (a wrong loss would move every weight differently)."""
    kept = total = 0
    for got, want in zip(module.parameters(), twin.parameters(), strict=True):
        keep = want.grad.abs() > tiny
        kept, total = kept + int(keep.sum()), total + keep.numel()
        torch.testing.assert_close(got.detach()[keep], want.detach()[keep], rtol=1e-5, atol=1e-6)
    assert kept > 0.9 * total
