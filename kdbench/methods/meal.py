"""Shen, He & Xue, AAAI 2019, "MEAL: Multi-Model Ensemble via Adversarial Learning" (official code AaronHeee/MEAL:
main.py, loss.py, models/discriminator.py; szq0214/MEAL has no snapshot here).

An ensemble of pre-trained teachers is distilled into one student without labels. Each iteration the teacher
selection module picks ONE teacher uniformly at random (main.py teacher_selector: np.random.randint over the teachers)
and only that teacher runs on the batch. (The paper's text could not be read here beyond its abstract; the selection
rule, like everything below, is the official code's.) At every block b (default: the logits only, the repo's ensemble
command `--out_layer [-1]`), the student is pulled towards the selected teacher by a similarity loss, and a
discriminator D_b (a method module) learns to tell teacher from student vectors:

  sim_b = similarity(v_s, v_t), with --loss ce (default) -(1/N) sum_i sum_c softmax(v_t)_ic log softmax(v_s)_ic;
          l1 / l2: the mean of |v_s - v_t| / (v_s - v_t)^2 over all entries; l1_soft / l2_soft: the same on softmaxes
  adv_b = BCEWithLogits(D_b([v_s; v_t]), [[1, 0]] * N + [[0, 1]] * N), the mean over the 2N x 2 entries (loss.py
          discriminatorLoss: student rows are labelled [1, 0], teacher rows [0, 1])

with v = the block's vector: the logits themselves, or for a feature map (N, C, H, W) the repo's fc_out pooling
(models/vgg.py with --pool_out avg): AdaptiveAvgPool1d(dim) over the H*W positions, then the mean over channels (a
dim-vector; `block_dims` gives dim per block, as the repo's --out_dims). T = 1 (no temperature); teacher detached.
D_b (models/discriminator.py Discriminator, K = 2): d -> d//2 -> d//4 -> 2, each layer followed by a ReLU -- the last
one too (option `final_relu`), 1x1 convolutions on the vector, i.e. Linear layers (same parameters, same default init).
With the final ReLU a fresh discriminator often scores small inputs 0 (BCE log 2, no gradient through those units).

total = ce * CE + sum_b (sim_b * sim_b + adv_b * adv_b), with the repo's ce 0 (no labels), gamma = eta = 1.

Code vs paper (option `adversarial`):
  - joint (default, the code): main.py sums sim + adv and one backward updates student and discriminators together,
    so the student too descends the discriminator's loss (the authors, issue #9: "trains discriminators and student
    jointly"; the gradient-reversal option --grl is off in every script).
  - reverse: the student's vectors reach D through a gradient reversal (identity forward, negated gradient back; the
    repo's --grl): D descends the BCE while the student ascends it, the usual min-max reading of the paper's
    "adversarial learning".
The discriminators' learning rate (option `discriminator_lr`): the repo puts them in the student's SGD as a parameter
group with --d_lr 1e-3 (momentum 0.9, weight decay 5e-4 from the SGD defaults, decayed with the same MultiStepLR). Here
they are stepped by the method with that SGD rule at discriminator_lr x (the run's current lr / its base lr), their
momentum buffers kept in the method's state (checkpointed); discriminator_lr: null puts them in the run's optimizer
instead (the student's lr). The teachers run in train mode (BatchNorm on batch statistics) as main.py leaves them
(--teacher_eval 0); teacher_train_mode: false runs them in eval mode.

The teacher draws replay: a torch.Generator per epoch seeded with epoch_seed(run seed, epoch, 11). The repo's CIFAR
recipe (README "Learning rate adjustment", main.py; CIFAR-100 "as CIFAR-10 except 100 outputs", AaronHeee/MEAL issue
#10): SGD lr 0.1 momentum 0.9 wd 5e-4, batch 128, lr x0.1 at 150a and 250a of 350a epochs, a in [1, 2] growing with
the number of teachers (main.py: milestones 150/250 for every student but DenseNet). The evaluated network is the
student; the discriminators are trained networks of the run (extra parameters), never evaluated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError
from kdbench.methods.ctkd import reverse_gradient
from kdbench.train import epoch_seed

SIMILARITIES = ("ce", "l1", "l2", "l1_soft", "l2_soft")
ADVERSARIAL = ("joint", "reverse")
SELECTION_STREAM = 11  # epoch_seed stream of the teacher draws


def meal_similarity_loss(student_vec: torch.Tensor, teacher_vec: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """MEAL's similarity loss between block vectors (N, D) (loss.py; the teacher side detached):
    ce: -(1/N) sum_i sum_d softmax(t)_id log softmax(s)_id; l1 / l2: mean |s - t| / (s - t)^2 over all entries;
    l1_soft / l2_soft: the same on softmax(s), softmax(t)."""
    t = teacher_vec.detach()
    if kind == "ce":
        return -(F.softmax(t, dim=1) * F.log_softmax(student_vec, dim=1)).sum(1).mean()
    if kind == "l1":
        return F.l1_loss(student_vec, t)
    if kind == "l2":
        return F.mse_loss(student_vec, t)
    if kind == "l1_soft":
        return F.l1_loss(F.softmax(student_vec, dim=1), F.softmax(t, dim=1))
    if kind == "l2_soft":
        return F.mse_loss(F.softmax(student_vec, dim=1), F.softmax(t, dim=1))
    raise KDBenchError(f"meal: method.similarity must be one of {list(SIMILARITIES)}, got '{kind}'")


def block_vector(feature: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """A block's vector: a (N, D) tensor as it is; a feature map (N, C, H, W) pooled as the repo's fc_out layers do,
    AdaptiveAvgPool1d(dim) over the H*W positions then the mean over the C channels -> (N, dim)."""
    if feature.dim() == 2:
        return feature
    if dim is None:
        raise KDBenchError("meal: a feature-map block needs its vector length in method.block_dims")
    return F.adaptive_avg_pool1d(feature.flatten(2), int(dim)).mean(1)


def meal_discriminator_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """BCEWithLogits (mean over all entries) of D's 2-vectors against [1, 0] for the student rows and [0, 1] for the
    teacher rows (loss.py discriminatorLoss, with the student half first)."""
    scores = torch.cat([student_scores, teacher_scores], 0)
    target = torch.zeros_like(scores)
    n = student_scores.shape[0]
    target[:n, 0] = 1.0
    target[n:, 1] = 1.0
    return F.binary_cross_entropy_with_logits(scores, target)


class MealDiscriminator(nn.Module):
    """d -> d//K -> d//K^2 -> 2 with a ReLU after every layer (the last one too unless final_relu is false); K = 2."""

    def __init__(self, dim: int, k: int = 2, final_relu: bool = True):
        super().__init__()
        h1, h2 = dim // k, dim // (k * k)
        if h2 < 1:
            raise KDBenchError(f"meal: a discriminator on {dim}-vectors has an empty layer ({dim} -> {h1} -> {h2})")
        self.body = nn.Sequential(nn.Linear(dim, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 2))
        self.final_relu = final_relu

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        out = self.body(v)
        return F.relu(out) if self.final_relu else out


@register_method("meal")
class MEAL(Method):
    paper = "Shen et al., MEAL: Multi-Model Ensemble via Adversarial Learning, AAAI 2019"
    code = "AaronHeee/MEAL"
    multi_teacher = True
    teacher_train_mode = True  # main.py --teacher_eval 0

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.similarity = str(cfg.get("similarity", "ce"))
        if self.similarity not in SIMILARITIES:
            raise KDBenchError(f"meal: method.similarity must be one of {list(SIMILARITIES)}, got '{self.similarity}'")
        self.adversarial = str(cfg.get("adversarial", "joint"))
        if self.adversarial not in ADVERSARIAL:
            raise KDBenchError(f"meal: method.adversarial must be one of {list(ADVERSARIAL)}, got '{self.adversarial}'")
        self.blocks = tuple(str(b) for b in (cfg.get("blocks") or ["logits"]))
        self.block_dims = self._dims_by_block(cfg.get("block_dims") or [])
        d_lr = cfg.get("discriminator_lr", 1e-3)
        self.discriminator_lr = None if d_lr is None else float(d_lr)
        self.discriminator_momentum = float(cfg.get("discriminator_momentum", 0.9))
        self.discriminator_weight_decay = float(cfg.get("discriminator_weight_decay", 5e-4))
        self.base_lr = float(pair.lr)
        self.seed = int(pair.seed)
        self.student_taps = tuple(b for b in self.blocks if b != "logits")
        self.teacher_taps = self.student_taps
        dims = {b: self._block_dim(b, pair) for b in self.blocks}
        self.discriminators = nn.ModuleDict(
            {b: MealDiscriminator(dims[b], final_relu=bool(cfg.get("final_relu", True))) for b in self.blocks})
        for name, p in self.discriminators.named_parameters():
            self.register_buffer(self._momentum_name(name), torch.zeros_like(p))
        self._draws: torch.Generator | None = None
        self._draws_epoch: int | None = None

    def _dims_by_block(self, dims) -> dict[str, int]:
        """block_dims: a list aligned with `blocks` (the repo's --out_dims; null for vector blocks), or a mapping."""
        if isinstance(dims, dict):
            return {str(k): int(v) for k, v in dims.items() if v is not None}
        dims = list(dims)
        if dims and len(dims) != len(self.blocks):
            raise KDBenchError(f"meal: method.block_dims {dims} must give one entry per block {list(self.blocks)} "
                               f"(null for a vector block)")
        return {b: int(v) for b, v in zip(self.blocks, dims) if v is not None}

    @staticmethod
    def _momentum_name(param_name: str) -> str:
        return "momentum_" + param_name.replace(".", "_")

    def _block_dim(self, block: str, pair) -> int:
        teachers = list(pair.teachers_shapes) or ([pair.teacher_shapes] if pair.teacher_shapes else [])
        for side, shapes in (("the student", pair.student_shapes), *(("a teacher", t) for t in teachers)):
            if block not in shapes:
                raise pair.incompatible("meal", f"{side} has no tap '{block}' (method.blocks: {list(self.blocks)})")
        shapes = [pair.student_shapes[block], *(t[block] for t in teachers)]
        if len(shapes[0]) == 1:
            if any(s != shapes[0] for s in shapes):
                raise pair.incompatible("meal", f"block '{block}' has different widths on student and teachers "
                                                f"({sorted({s[0] for s in shapes})})")
            return shapes[0][0]
        if block not in self.block_dims:
            raise pair.incompatible("meal", f"block '{block}' is a feature map: give its vector length in "
                                            f"method.block_dims, one entry per block (e.g. blocks [{block}, logits], "
                                            f"block_dims [1000, null])")
        return self.block_dims[block]

    # -- terms

    def terms(self, batch, student, teacher):
        out = {}
        for b in self.blocks:
            v_s = block_vector(student[b], self.block_dims.get(b))
            v_t = block_vector(teacher[b].detach(), self.block_dims.get(b))
            out[f"sim_{b}"] = meal_similarity_loss(v_s, v_t, self.similarity)
            d = self.discriminators[b]
            s_in = reverse_gradient(v_s, -1.0) if self.adversarial == "reverse" else v_s
            out[f"adv_{b}"] = meal_discriminator_loss(d(s_in), d(v_t))
        return out

    # -- the teacher selection module and the step

    def select_teacher(self, epoch: int, n_teachers: int) -> int:
        """One teacher index, uniform over n_teachers, from this epoch's replayable generator."""
        if self._draws is None or self._draws_epoch != epoch:
            self._draws = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, SELECTION_STREAM))
            self._draws_epoch = epoch
        return int(torch.randint(n_teachers, (), generator=self._draws))

    def forward_loss(self, batch, step):
        teacher = None
        if step.teachers:
            teacher = step.teachers[self.select_teacher(step.epoch, len(step.teachers))](batch)
        student = step.forward(batch.inputs, self.student_taps)
        return self.loss(batch, student, teacher, step.epoch)

    def trainable_parameters(self):
        """The discriminators join the run's optimizer only if discriminator_lr is null; else the method steps them."""
        return self.discriminators.parameters() if self.discriminator_lr is None else iter(())

    def train_step(self, batch, step):
        own = self.discriminator_lr is not None
        if own:
            for p in self.discriminators.parameters():
                p.grad = None
        with step.autocast():
            total, terms = self.forward_loss(batch, step)
        step.update(self, total, terms)
        if own:
            lr = step.run.step.optimizer.param_groups[0]["lr"]
            self.step_discriminators(self.discriminator_lr * lr / self.base_lr)
        return total, terms

    @torch.no_grad()
    def step_discriminators(self, lr: float) -> None:
        """PyTorch SGD on the discriminators (no dampening, no Nesterov): d = grad + wd * p, buf = momentum * buf + d
        (buf starts at 0, so the first step's buf is d, as torch.optim.SGD), p -= lr * buf."""
        for name, p in self.discriminators.named_parameters():
            if p.grad is None:
                continue
            buf = getattr(self, self._momentum_name(name))
            buf.mul_(self.discriminator_momentum).add_(p.grad + self.discriminator_weight_decay * p)
            p.sub_(lr * buf)

    def record_fields(self) -> dict:
        n_disc = sum(p.numel() for p in self.discriminators.parameters())
        optimizer = ("the run's optimizer" if self.discriminator_lr is None else
                     f"SGD lr {self.discriminator_lr:g} x the run's lr schedule, momentum "
                     f"{self.discriminator_momentum:g}, wd {self.discriminator_weight_decay:g}")
        return {"evaluated_head": "student",
                "trained_networks": ["student", *(f"discriminator[{b}]" for b in self.blocks)],
                "discriminator_params": n_disc, "discriminator_optimizer": optimizer,
                "teacher_selection": "one teacher per iteration, uniformly at random",
                "adversarial": self.adversarial}
