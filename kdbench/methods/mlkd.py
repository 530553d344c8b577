"""Jin, Wang & Lin 2023, "Multi-Level Logit Distillation" (CVPR; Jin-Ying/Multi-Level-Logit-Distillation pinned at
77b91ec7, 2023-03-28, whose loss and data code are the init commit 6327e733's; mdistiller/distillers/KD_ours.py
`KD_ours.forward_train`, SOLVER.TRAINER "ours").

Two views per batch: the weak one (the loader's crop + flip, batch.inputs) and a strong one built here (RandAugment(2,
10) FixMatch-style + Cutout, kdbench.methods.randaugment, drawn on the device from a generator seeded per epoch with
epoch_seed(seed, epoch, 11)). Student and teacher each run on both views (4 forwards per step; the teacher under
no_grad in eval mode). With p^T = softmax(z / T), raw logits, teacher detached, and the levels T in
temperatures = [temperature, 3, 5, 2, 6] (temperature = the cfg T, 4):

  kd(s, t, T)  = T^2 * sum_c p_t^T (log p_t^T - log p_s^T)                          per sample (mean over the batch)
  cc(s, t, T)  = sum_ij ((P_t^T' P_t^T) - (P_s^T' P_s^T))_ij^2 / C                  C x C class correlation
  bc(s, t, T)  = sum_ij ((P_t^T P_t^T') - (P_s^T P_s^T'))_ij^2 / B                  B x B batch correlation

Confidence masks, from the teacher's weak view at T = 1: sample mask = max_c p_t <= its batch median (np.percentile
50, linear interpolation: the LOW-confidence half), class mask = sum_i p_t,ic <= its median over classes.

The terms (each summed over the five levels):
  ce_strong  CE(z_s^strong, y)                       (the base class's `ce` is the weak view's)
  kd_weak    masked(kd(weak, weak))                  sample mask
  kd_strong  kd(strong, strong) at T = 4, 3, 5 plus kd(weak, weak) at T = 2, 6   (code; see strong_copy_paste)
  cc_weak    masked(cc(weak, weak))                  class mask
  bc_weak    masked(bc(weak, weak))                  sample mask
  cc_strong  cc(strong, strong) at 4, 3, 5 plus cc(weak, weak) at 2, 6 (code), no mask
  bc_strong  masked(bc(strong, strong))              sample mask
Reference total: 0.1 (CE + CE_strong) + 0.9 (kd_weak + kd_strong + cc_weak + bc_weak): cc_strong and bc_strong are
computed but never returned by the code, so they are logged here with weight 0.

Code vs paper, and the options:
  - mask_mode "scale" (code default): each term is reduced to a scalar before `(loss * mask).mean()` (reduce=False is
    commented out), so the mask only multiplies the batch-mean loss by the selected fraction (sample fraction for
    kd/bc, class fraction for cc). "select": the per-sample selection the code's commented-out path points to, kept
    on the unmasked normalisation: kd sums the selected samples' losses / B; bc and cc keep the Gram-matrix entries
    of the selected columns (samples, classes), / B and / C. (The commented-out code would divide cc and bc by a
    further C^2 and B^2 through its .mean(); we do not follow that.)
  - strong_copy_paste true (code default): in the strong kd and cc sums the T = 2 and T = 6 levels (the 4th and 5th
    temperatures) use the weak logits, a copy-paste in the code. false: the strong view throughout.
  - the paper adds its strong-view class/batch terms: set weights cc_strong, bc_strong to 0.9 (code: 0).
  Paper's variant: mask_mode=select strong_copy_paste=false weights.cc_strong=0.9 weights.bc_strong=0.9. The paper's
  own text was not available to us here; "paper" follows the code's evident intent (methods-modern.md, MLKD).
  - logit_standardization (LSKD's MLKD+LS, logit-standardization-KD mdistiller/distillers/MLKD.py): both logits are
    Z-scored (kdbench.methods.common.standardize_logits) in the kd terms only; cc, bc and the masks use raw logits.

The strong view vs the reference's: the reference draws its strong view from the raw image with its own RandomCrop
(pad 4) + flip before RandAugment; here it starts from the weak view (same crop and flip), since a method sees only
the batch. Each view has the reference's distribution; only their joint differs (shared crop and flip).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from kdbench.distill import Method, register_method
from kdbench.methods.common import standardize_logits
from kdbench.methods.randaugment import strong_view
from kdbench.train import epoch_seed

STRONG = "strong_logits"  # the outputs key of the strong view's logits (student and teacher)
SEED_STREAM = 11  # epoch_seed stream of the strong view's draws


def kd_per_sample(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N,) T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) per sample; teacher detached."""
    log_p_s = F.log_softmax(z_s / temperature, dim=1)
    log_p_t = F.log_softmax(z_t.detach() / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1) * temperature**2


def class_correlation_loss(z_s, z_t, temperature: float, class_mask=None) -> torch.Tensor:
    """sum_ij (P_t'P_t - P_s'P_s)_ij^2 / C with P = softmax(z/T) (B x C); with a (C,) mask only the columns of the
    selected classes count (still / C). Teacher detached."""
    p_s, p_t = F.softmax(z_s / temperature, dim=1), F.softmax(z_t.detach() / temperature, dim=1)
    diff = (p_t.t() @ p_t - p_s.t() @ p_s) ** 2
    if class_mask is not None:
        diff = diff * class_mask.to(diff.dtype)[None, :]
    return diff.sum() / z_s.shape[1]


def batch_correlation_loss(z_s, z_t, temperature: float, sample_mask=None) -> torch.Tensor:
    """sum_ij (P_t P_t' - P_s P_s')_ij^2 / B with P = softmax(z/T) (B x C); with a (B,) mask only the columns of the
    selected samples count (still / B). Teacher detached."""
    p_s, p_t = F.softmax(z_s / temperature, dim=1), F.softmax(z_t.detach() / temperature, dim=1)
    diff = (p_t @ p_t.t() - p_s @ p_s.t()) ** 2
    if sample_mask is not None:
        diff = diff * sample_mask.to(diff.dtype)[None, :]
    return diff.sum() / z_s.shape[0]


def confidence_masks(z_t_weak: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample mask (B,), class mask (C,)) from the teacher's weak logits at T = 1: max probability <= its median
    over the batch; summed class probability <= its median over the classes (np.percentile(., 50) = linear
    interpolation = torch.quantile)."""
    p = F.softmax(z_t_weak.detach().float(), dim=1)
    conf = p.max(dim=1).values
    class_conf = p.sum(dim=0)
    return conf <= torch.quantile(conf, 0.5), class_conf <= torch.quantile(class_conf, 0.5)


def mlkd_terms(s_weak, s_strong, t_weak, t_strong, targets, temperatures=(4.0, 3.0, 5.0, 2.0, 6.0),
               mask_mode: str = "scale", strong_copy_paste: bool = True,
               logit_standardization: bool = False) -> dict[str, torch.Tensor]:
    """MLKD's terms (see the module docstring), each summed over `temperatures`; `strong_copy_paste` makes the 4th and
    5th levels of the strong kd/cc sums use the weak logits, as the reference code does."""
    if mask_mode not in ("scale", "select"):
        raise ValueError(f"mlkd mask_mode must be 'scale' or 'select', got '{mask_mode}'")
    t_weak, t_strong = t_weak.detach(), t_strong.detach()
    sample_mask, class_mask = confidence_masks(t_weak)
    sample_frac, class_frac = sample_mask.float().mean(), class_mask.float().mean()
    z = standardize_logits if logit_standardization else (lambda v: v)
    kz = {"weak": (z(s_weak), z(t_weak)), "strong": (z(s_strong), z(t_strong))}  # the kd terms' logits
    raw = {"weak": (s_weak, t_weak), "strong": (s_strong, t_strong)}
    select = mask_mode == "select"

    def strong_source(level):
        return "weak" if strong_copy_paste and level >= 3 else "strong"

    terms = {k: 0.0 for k in ("kd_weak", "kd_strong", "cc_weak", "bc_weak", "cc_strong", "bc_strong")}
    for level, temp in enumerate(temperatures):
        temp = float(temp)
        kd_w = kd_per_sample(*kz["weak"], temp)
        terms["kd_weak"] = terms["kd_weak"] + ((kd_w * sample_mask).sum() / len(kd_w) if select
                                               else kd_w.mean() * sample_frac)
        terms["kd_strong"] = terms["kd_strong"] + kd_per_sample(*kz[strong_source(level)], temp).mean()
        if select:
            terms["cc_weak"] = terms["cc_weak"] + class_correlation_loss(*raw["weak"], temp, class_mask)
            terms["bc_weak"] = terms["bc_weak"] + batch_correlation_loss(*raw["weak"], temp, sample_mask)
            terms["bc_strong"] = terms["bc_strong"] + batch_correlation_loss(*raw["strong"], temp, sample_mask)
        else:
            terms["cc_weak"] = terms["cc_weak"] + class_correlation_loss(*raw["weak"], temp) * class_frac
            terms["bc_weak"] = terms["bc_weak"] + batch_correlation_loss(*raw["weak"], temp) * sample_frac
            terms["bc_strong"] = terms["bc_strong"] + batch_correlation_loss(*raw["strong"], temp) * sample_frac
        terms["cc_strong"] = terms["cc_strong"] + class_correlation_loss(*raw[strong_source(level)], temp)
    terms["ce_strong"] = F.cross_entropy(s_strong, targets)
    return terms


@register_method("mlkd")
class MLKD(Method):
    """Owns the forward: weak and strong views through student and teacher (forward_loss); terms() reads the strong
    view's logits under the outputs key `strong_logits`."""
    paper = "Jin, Wang & Lin, Multi-Level Logit Distillation, CVPR 2023"
    code = "Jin-Ying/Multi-Level-Logit-Distillation mdistiller/distillers/KD_ours.py"

    teacher_taps = ("logits",)
    task_terms = ("ce", "ce_strong")  # both views' label terms (for step policies that separate the task, DOT)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        if pair.teacher is None:
            raise pair.incompatible(self.method_name, "it needs a teacher")
        shape = tuple(pair.input_shape)
        if len(shape) != 3 or shape[0] != 3:
            raise pair.incompatible(self.method_name, f"its strong view (RandAugment) needs 3-channel images, but the "
                                                      f"inputs are {'x'.join(map(str, shape)) or 'of unknown shape'}")
        self.temperatures = (float(cfg.get("temperature", 4.0)), *(float(t) for t in cfg.get("extra_temperatures",
                                                                                              [3.0, 5.0, 2.0, 6.0])))
        self.mask_mode = str(cfg.get("mask_mode", "scale"))
        if self.mask_mode not in ("scale", "select"):
            raise ValueError(f"mlkd mask_mode must be 'scale' or 'select', got '{self.mask_mode}'")
        self.strong_copy_paste = bool(cfg.get("strong_copy_paste", True))
        self.logit_standardization = bool(cfg.get("logit_standardization", False))
        self.n_ops = int(cfg.get("randaugment_ops", 2))
        self.cutout = float(cfg.get("cutout", 0.5))
        # without a recorded normalisation (a bare PairInfo) the inputs are taken as images in [0, 1]
        self.mean = tuple(pair.mean) or (0.0,) * shape[0]
        self.std = tuple(pair.std) or (1.0,) * shape[0]
        self.seed = int(pair.seed)
        self._generator: tuple[int, torch.Generator] | None = None  # (epoch, generator)

    def generator(self, epoch: int, device) -> torch.Generator:
        """The strong view's generator: reseeded with epoch_seed(seed, epoch, 11) when the epoch changes, so a resumed
        run replays each epoch's draws."""
        device = torch.device(device)
        if self._generator is None or self._generator[0] != epoch or self._generator[1].device != device:
            gen = torch.Generator(device=device)
            gen.manual_seed(epoch_seed(self.seed, epoch, SEED_STREAM))
            self._generator = (epoch, gen)
        return self._generator[1]

    def strong_inputs(self, inputs: torch.Tensor, epoch: int) -> torch.Tensor:
        return strong_view(inputs, self.mean, self.std, self.generator(epoch, inputs.device), self.n_ops, self.cutout)

    def forward_loss(self, batch, step):
        strong = self.strong_inputs(batch.inputs, step.epoch)
        student = step.forward(batch.inputs, self.student_taps)
        student_strong = step.forward(strong, self.student_taps)
        teacher = step.teacher(batch)
        teacher_strong = step.teacher.with_taps(self.teacher_taps)(replace(batch, inputs=strong))  # live, never cached
        return self.loss(batch, {**student, STRONG: student_strong["logits"]},
                         {**teacher, STRONG: teacher_strong["logits"]}, step.epoch)

    def terms(self, batch, student, teacher):
        if STRONG not in student or STRONG not in teacher:
            raise KeyError(f"mlkd needs both views: the outputs lack '{STRONG}' (MLKD.forward_loss builds them)")
        return mlkd_terms(student["logits"], student[STRONG], teacher["logits"], teacher[STRONG], batch.targets,
                          self.temperatures, self.mask_mode, self.strong_copy_paste, self.logit_standardization)
