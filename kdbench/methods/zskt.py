"""Micaelli & Storkey, NeurIPS 2019, "Zero-shot Knowledge Transfer via Adversarial Belief Matching" (ZSKT;
polo5/ZeroShotKnowledgeTransfer, solver.py, models/generator.py, scripts/ZeroShot/main*.sh).

Per pseudo batch (one kdbench batch) a latent batch z is drawn; then
  1. `generator_steps` (1) generator steps on x = G(z): the generator maximises the divergence,
       adversarial  -KL(softmax(z_t / T) || softmax(z_s / T)), through both networks (student in train mode)
     with its own Adam (lr 1e-3, cosine-annealed; gradient norm clipped to 5);
  2. `student_steps` (10) student steps on x = G(z) regenerated after the generator's update (fixed from then on),
     with the teacher's logits and activations computed once:
       kl   KL(softmax(z_t / T) || softmax(z_s / T)), teacher detached
       at   sum over the stage outputs of mean over N*H*W of (a_s - a_t)^2, a = L2-normalised channel mean of f^2
            (kdbench.methods.at.at_loss: the code's attention_diff; the stage outputs are the code's block1..3
            activations of its WRNs; the larger map is pooled to the smaller when the pair's sizes differ)
     student total = kl + at * AT with at = beta = 250 (--AT_beta), the student's gradient norm clipped to 5.
KL reduction: the code's F.kl_div default ('mean' over N * C elements, `kl_reduction: elementwise`) — the paper's
D_KL is per sample (`kl_reduction: batchmean`); with Adam the choice mainly rescales the KL against beta * AT.
Attention: the code's squared mean (`at_form: code`, as above) is the default; the paper's eq. 2 writes
  sum_l || a_t / ||a_t||_2 - a_s / ||a_s||_2 ||_2 per sample (a non-squared distance), averaged over the batch here
(`at_form: paper`; the larger map is pooled to the smaller, as in the code form).
The generator (ZSKT's): Linear -> BN -> up -> conv-BN-LReLU -> up -> conv-BN-LReLU -> conv -> affine BN, no tanh.

Defaults: the paper's CIFAR-10 scripts (scripts/ZeroShot/main*.sh; the paper has no CIFAR-100 run): batch 128, latent
100, n_G 1, n_S 10, 80,000 pseudo batches (conf/experiment/zskt_cifar10.yaml: 200 epochs x 400), T 1, beta 250,
student Adam lr 2e-3 (the run's optim), both LRs cosine-annealed to 0 over the run (the code anneals per pseudo
batch, kdbench per epoch, for the generator here and the student through the run's cosine schedule).
The student's gradient clipping hooks the run's optimiser (a step pre-hook): the step policy has no clipping option.
"""
from __future__ import annotations

import torch

from kdbench.distill import register_method
from kdbench.methods.at import at_loss
from kdbench.methods.common import attention_map, match_spatial
from kdbench.methods.datafree import ConvGenerator, DataFreeMethod, generated_batch, kl_divergence

KL_REDUCTIONS = ("elementwise", "batchmean")
AT_FORMS = ("code", "paper")


def attention_distance(student_maps, teacher_maps, form: str = "code") -> torch.Tensor:
    """code: kdbench.methods.at.at_loss (sum over stages of mean over N*H*W of the squared difference of the
    normalised attention maps); paper: sum over stages of the batch mean of the per-sample L2 distance between them.
    The teacher side is detached."""
    teacher_maps = [t.detach() for t in teacher_maps]
    if form == "code":
        return at_loss(student_maps, teacher_maps)
    if form == "paper":
        total = 0.0
        for f_s, f_t in zip(student_maps, teacher_maps, strict=True):
            f_s, f_t = match_spatial(f_s, f_t)
            total = total + torch.linalg.vector_norm(attention_map(f_s) - attention_map(f_t), dim=1).mean()
        return total
    raise ValueError(f"at_form must be one of {list(AT_FORMS)}, got '{form}'")


def zskt_student_loss_terms(student_logits, teacher_logits, student_maps, teacher_maps, temperature: float = 1.0,
                            reduction: str = "elementwise", at_form: str = "code") -> dict[str, torch.Tensor]:
    """The student's unweighted terms: kl (teacher detached) and at (attention_distance; 0 without maps)."""
    return {"kl": kl_divergence(student_logits, teacher_logits.detach(), temperature, reduction),
            "at": attention_distance(student_maps, teacher_maps, at_form) if student_maps else
            student_logits.new_zeros(())}


def zskt_generator_loss(student_logits, teacher_logits, temperature: float = 1.0,
                        reduction: str = "elementwise") -> torch.Tensor:
    """-KL(teacher || student), both sides live: the generator seeks images where the student disagrees."""
    return -kl_divergence(student_logits, teacher_logits, temperature, reduction)


@register_method("zskt")
class ZSKT(DataFreeMethod):
    paper = "Micaelli & Storkey, Zero-shot Knowledge Transfer via Adversarial Belief Matching, NeurIPS 2019"
    code = "polo5/ZeroShotKnowledgeTransfer"
    GENERATOR_TERMS = ("adversarial",)
    STUDENT_TERMS = ("kl", "at")

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.temperature = float(cfg.get("temperature", 1.0))
        self.kl_reduction = str(cfg.get("kl_reduction", "elementwise"))
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"zskt: kl_reduction must be one of {list(KL_REDUCTIONS)}, got '{self.kl_reduction}'")
        self.at_form = str(cfg.get("at_form", "code"))
        if self.at_form not in AT_FORMS:
            raise ValueError(f"zskt: at_form must be one of {list(AT_FORMS)}, got '{self.at_form}'")
        self.student_steps = int(cfg.get("student_steps", 10))
        self.generator_steps = int(cfg.get("generator_steps", 1))
        self.clip_grad_norm = float(cfg.get("clip_grad_norm", 5.0) or 0.0)
        if float(cfg.weights.get("at", 0.0)):
            s_stages, t_stages = tuple(pair.student.stage_names), tuple(pair.teacher.stage_names)
            if not s_stages or len(s_stages) != len(t_stages):
                raise pair.incompatible(self.method_name, f"attention matching pairs stage outputs one to one: the "
                                                          f"student has {list(s_stages)}, the teacher {list(t_stages)} "
                                                          f"(set method.weights.at=0 to distil without it)")
            shapes = [pair.student_shapes[s] for s in s_stages] + [pair.teacher_shapes[t] for t in t_stages]
            if any(len(s) != 3 for s in shapes):
                raise pair.incompatible(self.method_name, "attention matching needs (C, H, W) stage outputs")
            self.student_taps, self.teacher_taps = s_stages, t_stages
        else:
            self.student_taps, self.teacher_taps = (), ()
        try:
            generator = ConvGenerator(int(cfg.get("latent_dim", 100)), self.input_shape,
                                      int(cfg.get("generator_width", 64)), float(cfg.get("generator_bn_eps", 1e-5)),
                                      tanh=False, final_affine=True)
        except ValueError as err:
            raise pair.incompatible(self.method_name, str(err)) from None
        self.build_generator(generator)
        self._hooked = None

    def terms(self, batch, student, teacher):
        out = zskt_student_loss_terms(student["logits"], teacher["logits"], [student[k] for k in self.student_taps],
                                      [teacher[k] for k in self.teacher_taps], self.temperature, self.kl_reduction,
                                      self.at_form)
        out["adversarial"] = zskt_generator_loss(student["logits"], teacher["logits"], self.temperature,
                                                 self.kl_reduction)
        return out

    def batches(self, loader, seed):
        """One batch per pseudo batch: G(z) with its graph, for the generator's step (the student's images are
        regenerated from the same z after that step)."""
        self.start_noise(seed)
        device = self.device()
        for _ in range(self.iterations):
            self.generator.train()
            z = self.latent(self.batch_size, device)
            yield generated_batch(self.generator(z), latent=z)

    def _clip_student_gradients(self, step) -> None:
        """Clip the student's gradient norm before every step of the run's optimiser (the code's clip_grad_norm_)."""
        optimizer = step.run.step.optimizer
        if not self.clip_grad_norm or self._hooked is optimizer:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        max_norm = self.clip_grad_norm

        def clip(opt, args, kwargs):
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)

        optimizer.register_step_pre_hook(clip)
        self._hooked = optimizer

    def train_step(self, batch, step):
        self._clip_student_gradients(step)
        teacher, epoch = self.teacher_model, step.epoch
        x, z = batch.inputs, batch.latent
        adversarial = None
        for g in range(self.generator_steps):
            if g:  # further generator steps regenerate from the same z
                x = self.generator(z)
            with step.autocast():
                adversarial = zskt_generator_loss(step.forward(x, ("logits",))["logits"], teacher(x),
                                                  self.temperature, self.kl_reduction)
            self.generator_step(self.term_weights(epoch)["adversarial"] * adversarial, epoch,
                                self.clip_grad_norm or None)
        with torch.no_grad(), step.autocast():  # the student's images: fixed until the next pseudo batch
            x = self.generator(z)
            t_out = teacher.forward_taps(x, self.teacher_taps)
        sums: dict[str, torch.Tensor] = {}
        for _ in range(self.student_steps):
            with step.autocast():
                s_out = step.forward(x, self.student_taps)
                terms = zskt_student_loss_terms(s_out["logits"], t_out["logits"],
                                                [s_out[k] for k in self.student_taps],
                                                [t_out[k] for k in self.teacher_taps], self.temperature,
                                                self.kl_reduction, self.at_form)
            step.update(self, self.weighted(terms, self.STUDENT_TERMS, epoch), terms)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach()
        terms = {k: v / max(self.student_steps, 1) for k, v in sums.items()}
        terms["adversarial"] = adversarial.detach()
        return self.weighted(terms, terms.keys(), epoch), terms
