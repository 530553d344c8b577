"""Yin et al., CVPR 2020, "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion" (DeepInversion and
Adaptive DeepInversion; NVlabs/DeepInversion, cifar10/deepinversion_cifar10.py `get_images`, and the maintainers'
answers in issues #6, #9, #20 for the knowledge-transfer part, which the repository does not contain).

Images are optimised from noise (no generator network): a batch of `synthesis_batch_size` inputs x ~ N(0, 1)
(normalised-input space) with target classes y (i mod num_classes, the script's [0..9]*25+[0..5]; or uniform random
with `random_labels`), then `synthesis_iterations` (2000) Adam steps (lr `synthesis_lr`, its state fresh per batch)
on, for x' = x rolled by random offsets in [-jitter, jitter] (2) along H and W (and flipped with `flip`):
  ce           CE(teacher(x'), y)
  bn           sum over the teacher's BatchNorm2d layers of ||var(h) - running_var||_2 + ||mean(h) - running_mean||_2,
               h = the layer's input, mean/var over (N, H, W), var biased (the feature-distribution regulariser)
  tv           ||d1||_2 + ||d2||_2 + ||d3||_2 + ||d4||_2 of x': horizontal, vertical and both diagonal differences
               (Frobenius norms over the whole batch, not squared: the script's loss_var)
  l2           ||x'||_2 (the whole batch)
  competition  (ADI) 1 - clamp(JS, 0, 1), JS = (KL(M || P) + KL(M || Q)) / 2 averaged over the batch, P, Q the
               student's and teacher's softmax at T = 3 and M = (P + Q) / 2, each clamped to [0.01, 0.99] (the
               script's form; note KL(M || .), not the textbook KL(. || M)); the student runs in eval mode
               (`competition_form: code`); `competition_form: paper` is the textbook JS the paper writes,
               (KL(P || M) + KL(Q || M)) / 2 without the clamps
objective = sum of `synthesis.<term>` * term. The teacher runs in eval mode (its running statistics are the
targets). The script keeps the last iterate (its `best_inputs` aliases the optimised tensor), so does kdbench.

Knowledge transfer (issues #6, #9): the student learns on a pool of synthesised batches with
  kd  T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), T = 3 ("the default value of 3", #9)
on `batch_size` images drawn uniformly from the pool, `iterations` steps per epoch through the run's optimiser.
Pool schedule: `initial_batches` synthesised before the first step, then one more every `synthesis_every` (50) KD
iterations until the pool holds `pool_batches` (1000 batches of 256, #6). DeepInversion (`deepinversion`): all 1000
first; ADI (`adi`): one new batch every 50 KD iterations, synthesised with the current student's competition term
(Table 1's caption as #6 quotes it; #20: ADI builds on the evolving student). The pool lives in memory and is not
part of the run checkpoint: a resumed run synthesises a new one.

Defaults (CIFAR-10, the paper's only CIFAR task; cifar10/README.md "paper parameters": bs 256, r_feature 10, di_lr
0.05, di_var_scale 2.5e-5 (script default), l2 0; 2000 iterations): synthesis {ce 1, bn 10, tv 2.5e-5, l2 0,
competition 0}; ADI's competition weight is 0.2, the value the README gives for the paper (its ImageNet runs): the
CIFAR-10 value could not be read here.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import register_method
from kdbench.losses import kd_loss
from kdbench.methods.datafree import DataFreeMethod, generated_batch

SYNTHESIS_TERMS = ("ce", "bn", "tv", "l2", "competition")
COMPETITION_FORMS = ("code", "paper")


def bn_statistics_loss(stats: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """sum over layers of ||var - running_var||_2 + ||mean - running_mean||_2; stats = (mean, var, running_mean,
    running_var) per BatchNorm layer (the batch statistics of its input, biased var)."""
    return sum(torch.linalg.vector_norm(rv.to(v.dtype) - v) + torch.linalg.vector_norm(rm.to(m.dtype) - m)
               for m, v, rm, rv in stats)


def batch_statistics(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of an (N, C, H, W) map over N, H and W."""
    return h.mean((0, 2, 3)), h.transpose(0, 1).flatten(1).var(1, unbiased=False)


def total_variation_l2(x: torch.Tensor) -> torch.Tensor:
    """||x[..., :-1] - x[..., 1:]|| + ||x[..., :-1, :] - x[..., 1:, :]|| + ||x[..., 1:, :-1] - x[..., :-1, 1:]||
    + ||x[..., :-1, :-1] - x[..., 1:, 1:]||, Frobenius norms over the whole batch."""
    diffs = (x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
             x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
    return sum(torch.linalg.vector_norm(d) for d in diffs)


def l2_prior(x: torch.Tensor) -> torch.Tensor:
    """||x||_2 over the whole batch."""
    return torch.linalg.vector_norm(x)


def competition_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 3.0,
                     form: str = "code") -> torch.Tensor:
    """ADI's 1 - clamp(JS, 0, 1), JS averaged over the batch; minimising it maximises the student-teacher
    disagreement. Both sides live (gradients reach the images). code: the script's clamped probabilities and
    (KL(M || P) + KL(M || Q)) / 2; paper: the textbook (KL(P || M) + KL(Q || M)) / 2, no clamps."""
    p = F.softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits / temperature, dim=1)
    n = student_logits.shape[0]
    if form == "code":
        m = (0.5 * (p + q)).clamp(0.01, 0.99)
        p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
        js = 0.5 * (m * (m.log() - p.log())).sum() / n + 0.5 * (m * (m.log() - q.log())).sum() / n
    elif form == "paper":
        m = 0.5 * (p + q)
        js = 0.5 * (p * (p.log() - m.log())).sum() / n + 0.5 * (q * (q.log() - m.log())).sum() / n
    else:
        raise ValueError(f"competition_form must be one of {list(COMPETITION_FORMS)}, got '{form}'")
    return 1.0 - js.clamp(0.0, 1.0)


class _BNStatistics:
    """Forward hooks on every BatchNorm2d of a model, keeping (mean, var, running_mean, running_var) per forward."""

    def __init__(self, model: nn.Module):
        self.stats: list = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    def _hook(self, module, inputs, output):
        mean, var = batch_statistics(inputs[0])
        self.stats.append((mean, var, module.running_mean, module.running_var))

    def close(self):
        for h in self.handles:
            h.remove()


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@register_method("deepinversion")
class DeepInversion(DataFreeMethod):
    paper = "Yin et al., Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion, CVPR 2020"
    code = "NVlabs/DeepInversion"
    STUDENT_TERMS = ("kd",)
    teacher_taps = ()

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        if not has_batchnorm(pair.teacher):
            raise pair.incompatible(self.method_name, "the feature-distribution term matches the teacher's BatchNorm "
                                                      "statistics, and the teacher has no BatchNorm2d layer")
        self.synthesis_batch_size = int(cfg.get("synthesis_batch_size", 256))
        self.synthesis_iterations = int(cfg.get("synthesis_iterations", 2000))
        self.synthesis_lr = float(cfg.get("synthesis_lr", 0.05))
        self.jitter = int(cfg.get("jitter", 2))
        self.flip = bool(cfg.get("flip", False))
        self.random_labels = bool(cfg.get("random_labels", False))
        self.competition_temperature = float(cfg.get("competition_temperature", 3.0))
        self.competition_form = str(cfg.get("competition_form", "code"))
        if self.competition_form not in COMPETITION_FORMS:
            raise ValueError(f"{self.method_name}: competition_form must be one of {list(COMPETITION_FORMS)}, "
                             f"got '{self.competition_form}'")
        self.pool_batches = int(cfg.get("pool_batches", 1000))
        self.initial_batches = int(cfg.get("initial_batches", 1000))
        self.synthesis_every = int(cfg.get("synthesis_every", 50))
        given = dict(cfg.get("synthesis") or {})
        unknown = sorted(set(given) - set(SYNTHESIS_TERMS))
        if unknown:
            raise ValueError(f"{self.method_name}: method.synthesis has no term {unknown}; its terms: "
                             f"{list(SYNTHESIS_TERMS)}")
        self.synthesis_weights = {k: float(given.get(k, 0.0)) for k in SYNTHESIS_TERMS}
        self.pool = None  # the synthesised images, allocated at the first batch (not saved in the checkpoint)
        self.pool_size = 0  # how many of them are filled
        self.kd_steps = 0  # KD iterations since the run started (drives the pool schedule)

    def terms(self, batch, student, teacher):
        return {"kd": kd_loss(student["logits"], teacher["logits"], self.kd_temperature)}

    # -- synthesis (the "generator step": images optimised with their own Adam)

    def synthesis_targets(self, n: int, device) -> torch.Tensor:
        if self.random_labels:
            return torch.randint(0, self.num_classes, (n,), generator=self._noise).to(device)
        return (torch.arange(n) % self.num_classes).to(device)

    def inversion_terms(self, x: torch.Tensor, targets: torch.Tensor, student=None) -> dict[str, torch.Tensor]:
        """The unweighted synthesis terms for (jittered) images x, with the teacher's BN statistics hooked."""
        hooks = _BNStatistics(self.teacher_model)
        try:
            z_t = self.teacher_model(x)
        finally:
            hooks.close()
        out = {"ce": F.cross_entropy(z_t, targets), "bn": bn_statistics_loss(hooks.stats),
               "tv": total_variation_l2(x), "l2": l2_prior(x)}
        if student is not None:
            out["competition"] = competition_loss(student(x), z_t, self.competition_temperature,
                                                  self.competition_form)
        return out

    def synthesize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: `synthesis_iterations` Adam steps on the images from noise (module docstring); the last iterate."""
        device, n = self.device(), self.synthesis_batch_size
        teacher, student = self.teacher_model, self.student_model
        was_teacher, was_student = teacher.training, student.training
        teacher.eval()
        student.eval()  # ADI: the student's logits, not its BN statistics
        compete = self.synthesis_weights["competition"] != 0
        x = torch.randn(n, *self.input_shape, generator=self._noise).to(device).requires_grad_()
        targets = self.synthesis_targets(n, device)
        opt = torch.optim.Adam([x], lr=self.synthesis_lr)
        try:
            for _ in range(self.synthesis_iterations):
                dy, dx = (torch.randint(-self.jitter, self.jitter + 1, (2,), generator=self._noise).tolist()
                          if self.jitter else (0, 0))
                x_jit = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
                if self.flip and bool(torch.rand((), generator=self._noise) < 0.5):
                    x_jit = x_jit.flip(3)
                terms = self.inversion_terms(x_jit, targets, student if compete else None)
                loss = sum(self.synthesis_weights[k] * v for k, v in terms.items() if self.synthesis_weights[k])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        finally:
            teacher.train(was_teacher)
            student.train(was_student)
            student.zero_grad(set_to_none=True)  # the competition term's gradients are not the student's step
        return x.detach(), targets

    @property
    def pool_count(self) -> int:
        """Synthesised batches in the pool."""
        return self.pool_size // self.synthesis_batch_size

    def _grow_pool(self) -> None:
        if self.pool_count >= self.pool_batches:
            return
        images, _ = self.synthesize()
        if self.pool is None:
            self.pool = images.new_empty(self.pool_batches * images.shape[0], *images.shape[1:])
        self.pool[self.pool_size:self.pool_size + images.shape[0]] = images
        self.pool_size += images.shape[0]

    def batches(self, loader, seed):
        """`iterations` KD batches drawn uniformly from the pool of synthesised images, which grows on its schedule
        (module docstring) before the batch is drawn; the loader is never touched."""
        self.start_noise(seed)
        while self.pool_count < min(max(self.initial_batches, 1), self.pool_batches):
            self._grow_pool()
        for _ in range(self.iterations):
            if self.kd_steps and self.synthesis_every and self.kd_steps % self.synthesis_every == 0:
                self._grow_pool()
            idx = torch.randint(0, self.pool_size, (self.batch_size,), generator=self._noise).to(self.pool.device)
            self.kd_steps += 1
            yield generated_batch(self.pool[idx])

    def train_step(self, batch, step):
        with step.autocast():
            with torch.no_grad():
                t_out = self.teacher_model.forward_taps(batch.inputs, ())
            batch.targets = t_out["logits"].argmax(1)
            s_out = step.forward(batch.inputs, ("logits",))
            total, terms = self.loss(batch, s_out, t_out, step.epoch)
        step.update(self, total, terms)
        return total.detach(), {k: v.detach() for k, v in terms.items()}

    def record_fields(self) -> dict:
        return {**super().record_fields(), "synthesis": dict(self.synthesis_weights),
                "pool_images_max": self.pool_batches * self.synthesis_batch_size}
