"""Chen et al., ICCV 2019, "Data-Free Learning of Student Networks" (DAFL; huawei-noah/Efficient-Computing,
Data-Efficient-Model-Compression/DAFL/DAFL-train.py; MMRazor's DAFL losses compute the same three generator terms).

No training image is read. Each iteration draws z ~ N(0, I) (batch `batch_size`, `latent_dim`), generates x = G(z)
(ConvGenerator, kdbench.methods.datafree) and runs the fixed teacher on x (eval mode) with gradients to x:
  one_hot       CE(z_t, argmax z_t)                                 the teacher's own prediction as the label
  activation    -mean |f_t|          (code; `activation_reduction: mean`)
                -(1/N) sum_i ||f_t^i||_1 (paper eq. 4; `activation_reduction: l1`), f_t = the teacher's feature
                before its classifier (`feature_tap`: embedding for the ResNets; stage3 = conv5 output for LeNet-5,
                the 120-d vector the reference LeNet returns as its feature)
  info_entropy  sum_c pbar_c * log_b pbar_c, pbar = mean_i softmax(z_t^i) (the negative entropy of the batch's
                mean prediction; code: log base 10 = `entropy_log_base: 10`; the paper writes H_info without a base)
The generator minimises one_hot * L_oh + info_entropy * L_ie + activation * L_a (weights = the reference's --oh,
--ie, --a) with its own Adam; the student then minimises
  kd            T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) averaged over the batch, on x detached and the
                teacher's logits detached (code: T = 1, kdloss = KL summed / N; the paper's cross entropy to the
                teacher's outputs differs from it by the teacher's entropy, a constant: the same gradients)
through the run's optimiser (the reference's optimizer_S). The reference backpropagates the sum of all four terms
once and steps both optimisers; the terms share no parameter, so the generator step followed by the student step on
the same images and teacher outputs is the same update.

Defaults: the README's CIFAR-100 run (DAFL-train.py --dataset cifar100 --channels 3 --n_epochs 2000 --batch_size 1024
--lr_G 0.02 --lr_S 0.1 --latent_dim 1000 --oh 0.5 --ie 20 --a 0.1), 120 iterations per epoch, the generator's LR
constant (the code decays only the student's: x0.1 at epochs 800 and 1600, SGD momentum 0.9, wd 5e-4 — the run's
optim/schedule, see conf/experiment/dafl_cifar100.yaml). The MNIST run (conf/experiment/dafl_mnist.yaml) uses the
script's defaults: batch 512, 200 epochs, lr_G 0.2, Adam lr_S 2e-3, latent 100, oh 1, ie 5, a 0.1.
The generator's middle BatchNorms have eps 0.8 (the reference's `nn.BatchNorm2d(128, 0.8)`; option
`generator_bn_eps`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdbench.distill import register_method
from kdbench.losses import kd_loss
from kdbench.methods.datafree import ConvGenerator, DataFreeMethod, generated_batch

ACTIVATION_REDUCTIONS = ("mean", "l1")


def one_hot_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean CE of the teacher's logits against their own argmax (DAFL eq. 3; gradients reach the inputs)."""
    return F.cross_entropy(teacher_logits, teacher_logits.detach().argmax(1))


def activation_loss(teacher_features: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """-mean |f| over every element (code), or -(1/N) sum_i ||f_i||_1 (paper eq. 4, reduction 'l1')."""
    f = teacher_features.flatten(1)
    if reduction == "mean":
        return -f.abs().mean()
    if reduction == "l1":
        return -f.abs().sum(1).mean()
    raise ValueError(f"activation_reduction must be one of {list(ACTIVATION_REDUCTIONS)}, got '{reduction}'")


def information_entropy_loss(teacher_logits: torch.Tensor, log_base: float = 10.0) -> torch.Tensor:
    """sum_c pbar_c * log_b(pbar_c), pbar = the batch mean of softmax(z_t): minimising it balances the classes
    (DAFL eq. 6; the code's log10 for base 10)."""
    pbar = F.softmax(teacher_logits, dim=1).mean(0)
    return (pbar * torch.log(pbar)).sum() / math.log(log_base)


def dafl_generator_losses(teacher_logits: torch.Tensor, teacher_features: torch.Tensor, log_base: float = 10.0,
                          activation_reduction: str = "mean") -> dict[str, torch.Tensor]:
    """The generator's three unweighted terms on the teacher's outputs for generated images."""
    return {"one_hot": one_hot_loss(teacher_logits),
            "activation": activation_loss(teacher_features, activation_reduction),
            "info_entropy": information_entropy_loss(teacher_logits, log_base)}


@register_method("dafl")
class DAFL(DataFreeMethod):
    paper = "Chen et al., Data-Free Learning of Student Networks, ICCV 2019"
    code = "huawei-noah/Efficient-Computing Data-Efficient-Model-Compression/DAFL"
    GENERATOR_TERMS = ("one_hot", "activation", "info_entropy")
    STUDENT_TERMS = ("kd",)
    student_taps = ()

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.feature_tap = str(cfg.get("feature_tap", "embedding"))
        self.teacher_taps = (self.feature_tap,)
        self.entropy_log_base = float(cfg.get("entropy_log_base", 10.0))
        self.activation_reduction = str(cfg.get("activation_reduction", "mean"))
        if self.activation_reduction not in ACTIVATION_REDUCTIONS:
            raise ValueError(f"dafl: activation_reduction must be one of {list(ACTIVATION_REDUCTIONS)}, "
                             f"got '{self.activation_reduction}'")
        if self.feature_tap not in pair.teacher.tap_names:
            raise pair.incompatible(self.method_name, f"the teacher has no tap '{self.feature_tap}' (method.feature_tap)"
                                                      f"; it has: {', '.join(pair.teacher.tap_names)}")
        try:
            generator = ConvGenerator(int(cfg.get("latent_dim", 1000)), self.input_shape,
                                      int(cfg.get("generator_width", 64)), float(cfg.get("generator_bn_eps", 0.8)),
                                      tanh=True, final_affine=False)
        except ValueError as err:
            raise pair.incompatible(self.method_name, str(err)) from None
        self.build_generator(generator)

    def terms(self, batch, student, teacher):
        out = dafl_generator_losses(teacher["logits"], teacher[self.feature_tap], self.entropy_log_base,
                                    self.activation_reduction)
        out["kd"] = kd_loss(student["logits"], teacher["logits"], self.kd_temperature)
        return out

    def batches(self, loader, seed):
        """`iterations` batches of G(z), generated with their graph (the generator's step backpropagates into it);
        the loader is never touched."""
        self.start_noise(seed)
        device = self.device()
        for _ in range(self.iterations):
            self.generator.train()
            z = self.latent(self.batch_size, device)
            yield generated_batch(self.generator(z), latent=z)

    def train_step(self, batch, step):
        teacher = self.teacher_model
        with step.autocast():
            t_out = teacher.forward_taps(batch.inputs, self.teacher_taps)  # gradients flow to the images
            batch.targets = t_out["logits"].detach().argmax(1)  # the pseudo-labels of the one-hot term
            s_out = step.forward(batch.inputs.detach(), ("logits",))
            total, terms = self.loss(batch, s_out, t_out, step.epoch)
        self.generator_step(self.weighted(terms, self.GENERATOR_TERMS, step.epoch), step.epoch)
        step.update(self, self.weighted(terms, self.STUDENT_TERMS, step.epoch), terms)
        return total.detach(), {k: v.detach() for k, v in terms.items()}
