"""What the data-free methods (DAFL, DFAD, ZSKT, DeepInversion) share: they never read the training split. A generator
(or images optimised from noise) stands in for the data, so each method yields its own batches of generated images
from `batches()` and owns its step in `train_step()`: the generator's step with an optimiser the method holds, then
the student's step through the run's step policy (`step.update`). Evaluation stays on the real test split.

  - GeneratedBatch       a Batch of generated images: `indices` are positions in the batch (no dataset index),
                         `targets` whatever labels the method assigns (the teacher's argmax, DeepInversion's target
                         classes), `latent` the noise the images came from
  - ConvGenerator        the generator of DAFL (huawei-noah DAFL-train.py `Generator`), DFAD (VainF
                         network/gan.py `GeneratorA`) and ZSKT (polo5 models/generator.py): Linear -> BN -> 2x up ->
                         conv-BN-LeakyReLU -> 2x up -> conv-BN-LeakyReLU -> conv -> [tanh] -> BN; the three differ
                         only in the BN eps of the two middle BNs (DAFL's `BatchNorm2d(c, 0.8)` passes 0.8 as eps),
                         the tanh (not in ZSKT) and the last BN's affine (ZSKT)
  - DataFreeMethod       the shared plumbing: its randomness replays from epoch_seed(seed, epoch, stream 11), the
                         generator's optimiser (Adam) and its LR schedule, whose state is saved in the run checkpoint
                         through the module's extra state, the record fields (networks trained, extra parameters,
                         that no training image was read), and no teacher cache (outputs of generated images are live)
  - generator_lr(...)    constant / step / cosine, per epoch like the run's own LR

The teacher is frozen (requires_grad off) when the method is built: the generator's losses backpropagate through it
into the images, never into its weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.data.loader import Batch
from kdbench.distill import Method
from kdbench.models import count_parameters
from kdbench.train import epoch_seed

NOISE_STREAM = 11  # the data-free methods' own random stream (latent codes, pool sampling, jitter)
GENERATOR_SCHEDULES = ("constant", "step", "cosine")


@dataclass
class GeneratedBatch(Batch):
    """A batch of generated images (normalised-input space, as `Batch.inputs`). `latent` is the noise they came from
    (None for images optimised directly); the data-free methods never put a dataset index in `indices`."""

    latent: Optional[torch.Tensor] = None


def generated_batch(images: torch.Tensor, targets: Optional[torch.Tensor] = None,
                    latent: Optional[torch.Tensor] = None) -> GeneratedBatch:
    """A GeneratedBatch of `images`; without targets, every target is -1 (no label: the method assigns one when it
    needs it, e.g. the teacher's argmax)."""
    n, device = images.shape[0], images.device
    if targets is None:
        targets = torch.full((n,), -1, dtype=torch.long, device=device)
    return GeneratedBatch(images, targets, torch.arange(n, device=device), torch.zeros(n, 2, dtype=torch.long),
                          torch.zeros(n, dtype=torch.bool), latent=latent)


class ConvGenerator(nn.Module):
    """z (N, latent_dim) -> images (N, C, H, W), H and W divisible by 4 (see the module docstring for the layers).

    width = ngf: the first conv blocks have 2*ngf channels, the last hidden one ngf (DAFL's 128/64 is ngf 64)."""

    def __init__(self, latent_dim: int, image_shape: Sequence[int], width: int = 64, bn_eps: float = 1e-5,
                 tanh: bool = True, final_affine: bool = False):
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise ValueError(f"the generator upsamples twice by 2: image height and width must be divisible by 4, "
                             f"got {h}x{w}")
        self.latent_dim, self.init_size = int(latent_dim), (h // 4, w // 4)
        self.l1 = nn.Linear(latent_dim, 2 * width * self.init_size[0] * self.init_size[1])
        self.bn0 = nn.BatchNorm2d(2 * width)
        self.conv1 = nn.Conv2d(2 * width, 2 * width, 3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(2 * width, eps=bn_eps)
        self.conv2 = nn.Conv2d(2 * width, width, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(width, eps=bn_eps)
        self.conv3 = nn.Conv2d(width, c, 3, stride=1, padding=1)
        self.tanh = bool(tanh)
        self.bn3 = nn.BatchNorm2d(c, affine=final_affine)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.l1(z.flatten(1)).view(z.shape[0], -1, *self.init_size)
        x = F.interpolate(self.bn0(x), scale_factor=2)
        x = F.leaky_relu(self.bn1(self.conv1(x)), 0.2)
        x = F.interpolate(x, scale_factor=2)
        x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
        x = self.conv3(x)
        return self.bn3(torch.tanh(x) if self.tanh else x)


def generator_lr(epoch: int, base: float, schedule: str, milestones: Sequence[int] = (), gamma: float = 0.1,
                 epochs: int = 1) -> float:
    """The generator's LR in 1-indexed `epoch`: constant; step (base * gamma^#{m : epoch > m}, the run's step rule);
    cosine over `epochs` (base * (1 + cos(pi * (epoch - 1) / epochs)) / 2, the run's cosine rule with min 0)."""
    if schedule == "constant":
        return base
    if schedule == "step":
        return base * gamma ** sum(epoch > m for m in milestones)
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max(epochs, 1)))
    raise ValueError(f"generator_schedule must be one of {list(GENERATOR_SCHEDULES)}, got '{schedule}'")


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(z_t / T) || softmax(z_s / T)), both sides live (no detach: a generator maximises it through both
    networks). reduction: batchmean = sum / N (per-sample KL averaged); elementwise = sum / (N * C) (F.kl_div's
    'mean', the reduction of ZSKT's code)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    total = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    if reduction == "batchmean":
        return total / student_logits.shape[0]
    if reduction == "elementwise":
        return total / student_logits.numel()
    raise ValueError(f"reduction must be 'batchmean' or 'elementwise', got '{reduction}'")


class DataFreeMethod(Method):
    """Plumbing shared by the data-free methods (module docstring). Subclasses build `self.generator` (or none),
    set GENERATOR_TERMS / STUDENT_TERMS, and implement batches() and train_step()."""

    teacher_cache = False  # the teacher sees generated images: its outputs are always live
    task_terms = ()  # no labelled task term: there is no data
    GENERATOR_TERMS: tuple[str, ...] = ()
    STUDENT_TERMS: tuple[str, ...] = ()

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        if pair.teacher is None:
            raise pair.incompatible(self.method_name, "a data-free method distils from a teacher; none is given")
        if len(pair.input_shape) != 3:
            raise pair.incompatible(self.method_name, f"generated inputs are images (C, H, W); the pair's input "
                                                      f"shape is {tuple(pair.input_shape)}")
        pair.teacher.requires_grad_(False)  # generator losses reach the images through it, never its weights
        self.input_shape = tuple(int(v) for v in pair.input_shape)
        self.num_classes = int(pair.num_classes)
        self.run_seed, self.run_epochs = int(pair.seed), int(pair.epochs)
        self.batch_size = int(cfg.get("batch_size", 256))
        self.iterations = int(cfg.get("iterations", 50))
        self.generator_lr_base = float(cfg.get("generator_lr", 1e-3))
        self.generator_schedule = str(cfg.get("generator_schedule", "constant"))
        self.generator_milestones = tuple(int(m) for m in (cfg.get("generator_milestones") or ()))
        self.generator_gamma = float(cfg.get("generator_gamma", 0.1))
        if self.generator_schedule not in GENERATOR_SCHEDULES:
            raise ValueError(f"{self.method_name}: generator_schedule must be one of {list(GENERATOR_SCHEDULES)}, "
                             f"got '{self.generator_schedule}'")
        # not submodules: the pair's networks stay out of this module's parameters, state and extra-parameter count
        self._nets = (pair.teacher, pair.student)
        self.generator: Optional[nn.Module] = None
        self.generator_optimizer: Optional[torch.optim.Optimizer] = None
        self._noise: Optional[torch.Generator] = None

    # -- building blocks for subclasses

    def build_generator(self, generator: nn.Module) -> None:
        """Adopt `generator` and its Adam optimiser (betas (0.9, 0.999), no weight decay: every reference's)."""
        self.generator = generator
        self.generator_optimizer = torch.optim.Adam(generator.parameters(), lr=self.generator_lr_base)

    def generator_step(self, loss: torch.Tensor, epoch: int, clip_norm: Optional[float] = None) -> None:
        """One step of the generator's own optimiser on `loss`, at its LR for `epoch`."""
        opt = self.generator_optimizer
        lr = generator_lr(epoch, self.generator_lr_base, self.generator_schedule, self.generator_milestones,
                          self.generator_gamma, self.run_epochs)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(self.generator.parameters(), clip_norm)
        opt.step()

    def weighted(self, terms: dict[str, torch.Tensor], names, epoch: int) -> torch.Tensor:
        """sum of weight * term over `names` (weight-0 terms left out), with the weights of `epoch`."""
        weights = self.term_weights(epoch)
        parts = [weights[k] * terms[k] for k in names if k in terms and weights[k] != 0]
        return sum(parts) if parts else torch.zeros((), device=next(iter(terms.values())).device)

    def start_noise(self, seed: int) -> torch.Generator:
        """The epoch's generator of latent codes (and other draws): seeded from epoch_seed(run seed, epoch, 11). The
        loop hands batches() the epoch's data seed epoch_seed(run seed, epoch); the epoch is recovered from it (a
        seed that matches no epoch of the run, e.g. a direct call in a test, seeds the stream from itself)."""
        epoch = next((e for e in range(1, self.run_epochs + 1) if epoch_seed(self.run_seed, e) == seed), None)
        value = epoch_seed(self.run_seed, epoch, NOISE_STREAM) if epoch is not None else epoch_seed(seed, 0, NOISE_STREAM)
        self._noise = torch.Generator().manual_seed(value)
        return self._noise

    def latent(self, n: int, device) -> torch.Tensor:
        """n latent codes ~ N(0, I) from the epoch's stream (drawn on the CPU, so a run replays on any device)."""
        return torch.randn(n, self.generator.latent_dim, generator=self._noise).to(device)

    def device(self) -> torch.device:
        return next(self._nets[1].parameters()).device

    @property
    def teacher_model(self):
        return self._nets[0]

    @property
    def student_model(self):
        return self._nets[1]

    # -- the Method hooks

    def trainable_parameters(self):
        """Nothing joins the student's optimiser: the generator has its own."""
        return iter(())

    def get_extra_state(self):
        return {"generator_optimizer": self.generator_optimizer.state_dict()} if self.generator_optimizer else {}

    def set_extra_state(self, state):
        if state and self.generator_optimizer is not None and "generator_optimizer" in state:
            self.generator_optimizer.load_state_dict(state["generator_optimizer"])

    def record_fields(self) -> dict:
        """The student is what the run evaluates; the generator (if any) is trained beside it, by its own optimiser,
        and is the method's only extra network (extra_params)."""
        trained = {"student": count_parameters(self.student_model)}
        if self.generator is not None:
            trained["generator"] = count_parameters(self.generator)
        return {"evaluated_network": "student", "training_data_read": False, "networks_trained": trained}

    def eval_logits(self, student, inputs):
        return student(inputs)
