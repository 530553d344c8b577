"""Fang et al. 2019, "Data-Free Adversarial Distillation" (DFAD; VainF/Data-Free-Adversarial-Distillation, DFAD_cifar.py
and DFAD_mnist.py).

A min-max game on the teacher-student discrepancy, measured as the mean absolute error of the logits:
  l1           mean |z_s - z_t| over batch and classes (F.l1_loss), teacher detached: the student minimises it on
               generated images x = G(z) generated without gradient (`fake = generator(z).detach()`)
  adversarial  -mean |z_s - z_t| on freshly generated images, gradients through both networks into the generator:
               the generator maximises the discrepancy (`generator_loss: negative_l1`, the code's loss_G; the code's
               commented-out alternative -log(1 + L1) is `generator_loss: log`)
Per iteration (one kdbench batch): `student_steps` (5) student steps, each on its own fresh batch of `batch_size`
generated images, then one generator step on another fresh batch, in the code's order. The generator runs in train
mode throughout (its BatchNorms use batch statistics), the teacher in eval mode, the student in train mode in both
steps (its BN statistics also move during the generator's forward, as in the code).

Defaults: the README's CIFAR-100 command (DFAD_cifar.py --dataset cifar100 --scheduler): batch 256, 50 iterations
per epoch ("we regard such a period as an epoch"), 500 epochs, latent 256 (--nz), generator Adam lr 1e-3, student SGD
lr 0.1 momentum 0.9 wd 5e-4 (the run's optim), both LRs x0.1 by MultiStepLR([100, 200]) stepped at the start of each
epoch before training: in kdbench's 1-indexed "epoch > m" rule that is milestones [99, 199] (epochs 1-99 at the base
LR), for the generator here (`generator_milestones`) and the student in conf/experiment/dfad_cifar100.yaml. Generator:
GeneratorA (ngf 64, tanh, non-affine last BN; ConvGenerator with bn eps 1e-5). MNIST (DFAD_mnist.py defaults, no
--scheduler): batch 512, 40 epochs of 50 iterations, latent 100, student SGD lr 0.01 momentum 0.9 wd 1e-4, generator
Adam 1e-3, both constant.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdbench.distill import register_method
from kdbench.methods.datafree import ConvGenerator, DataFreeMethod, generated_batch

GENERATOR_LOSSES = ("negative_l1", "log")


def dfad_student_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """mean |z_s - z_t| over batch and classes, teacher detached (the student's MAE to the teacher)."""
    return F.l1_loss(student_logits, teacher_logits.detach())


def dfad_generator_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                        form: str = "negative_l1") -> torch.Tensor:
    """The generator's loss, both sides live: -mean |z_s - z_t| (negative_l1), or -log(1 + mean |z_s - z_t|) (log)."""
    l1 = F.l1_loss(student_logits, teacher_logits)
    if form == "negative_l1":
        return -l1
    if form == "log":
        return -torch.log1p(l1)
    raise ValueError(f"generator_loss must be one of {list(GENERATOR_LOSSES)}, got '{form}'")


@register_method("dfad")
class DFAD(DataFreeMethod):
    paper = "Fang et al., Data-Free Adversarial Distillation, arXiv 2019"
    code = "VainF/Data-Free-Adversarial-Distillation"
    GENERATOR_TERMS = ("adversarial",)
    STUDENT_TERMS = ("l1",)
    teacher_taps = ()

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.student_steps = int(cfg.get("student_steps", 5))
        self.generator_loss = str(cfg.get("generator_loss", "negative_l1"))
        if self.generator_loss not in GENERATOR_LOSSES:
            raise ValueError(f"dfad: generator_loss must be one of {list(GENERATOR_LOSSES)}, got '{self.generator_loss}'")
        try:
            generator = ConvGenerator(int(cfg.get("latent_dim", 256)), self.input_shape,
                                      int(cfg.get("generator_width", 64)), float(cfg.get("generator_bn_eps", 1e-5)),
                                      tanh=True, final_affine=False)
        except ValueError as err:
            raise pair.incompatible(self.method_name, str(err)) from None
        self.build_generator(generator)

    def terms(self, batch, student, teacher):
        z_s, z_t = student["logits"], teacher["logits"]
        return {"l1": dfad_student_loss(z_s, z_t), "adversarial": dfad_generator_loss(z_s, z_t, self.generator_loss)}

    def batches(self, loader, seed):
        """Per iteration, the images of its `student_steps` student steps (each block of `batch_size` generated on
        its own, without gradient), stacked; the generator step draws its own batch in train_step."""
        self.start_noise(seed)
        device = self.device()
        for _ in range(self.iterations):
            self.generator.train()
            with torch.no_grad():
                zs = [self.latent(self.batch_size, device) for _ in range(self.student_steps)]
                images = torch.cat([self.generator(z) for z in zs])
            yield generated_batch(images, latent=torch.cat(zs))

    def train_step(self, batch, step):
        teacher, n = self.teacher_model, self.batch_size
        l1_sum = 0.0
        for x in batch.inputs.split(n):  # the student's steps, each on its own block of generated images
            with step.autocast():
                with torch.no_grad():
                    z_t = teacher(x)
                z_s = step.forward(x, ("logits",))["logits"]
                l1 = dfad_student_loss(z_s, z_t)
            step.update(self, self.term_weights(step.epoch)["l1"] * l1, {"l1": l1})
            l1_sum = l1_sum + l1.detach()
        self.generator.train()
        with step.autocast():  # then the generator's step on a fresh batch, through both networks
            x = self.generator(self.latent(n, batch.inputs.device))
            adversarial = dfad_generator_loss(step.forward(x, ("logits",))["logits"], teacher(x), self.generator_loss)
        terms = {"l1": l1_sum / len(batch.inputs.split(n)), "adversarial": adversarial}
        self.generator_step(self.weighted(terms, self.GENERATOR_TERMS, step.epoch), step.epoch)
        terms = {k: v.detach() for k, v in terms.items()}
        return self.weighted(terms, terms.keys(), step.epoch), terms
