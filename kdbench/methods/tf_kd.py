"""Yuan, Tay, Li, Wang & Feng, CVPR 2020, "Revisiting Knowledge Distillation via Label Smoothing Regularization"
(Teacher-free KD, Tf-KD). Two registered methods, because `needs_teacher` is a class attribute:

`tf_kd` -- Tf-KD_reg, the manually designed ("virtual") teacher; needs_teacher = False.
  The virtual teacher puts `correct_prob` (a) on the true class and (1 - a)/(K - 1) on every other class:
      p^d(k) = a if k == y else (1 - a) / (K - 1)
  What kdbench implements is what the authors' code does (yuanli2333/Teacher-free-Knowledge-Distillation,
  my_loss_function.py, loss_kd_regularization):
      target  = softmax(p^d / T)        the probability vector p^d itself is divided by T and re-softmaxed
      tf_kd   = KL(target || softmax(z_s))   the student is NOT softened, and there is no T^2 factor
      total   = ce * CE(z_s, y) + tf_kd * tf_kd
  Note that softmax(p^d / T) at the code's T = 20 is nearly uniform (for K = 100, a = 0.99 the true class gets
  ~1.05% vs ~0.999% elsewhere): in practice a label-smoothing-like pull towards uniform.
  The paper's equation instead writes D_KL(p^d_tau, p_tau) with both sides softened; we follow the code (the
  paper's numbers come from it). Reduction: the code uses nn.KLDivLoss() = mean over all B*K elements, times
  `multiplier`; kdbench uses "batchmean" (sum over classes, mean over samples), so the code's
  alpha * multiplier * KL_mean equals weight alpha * multiplier / K on our term. The code's defaults:
  a = 0.99 (hard-coded), and per CIFAR-100 model (experiments/base_experiments/*/params.json):
      ResNet18     alpha 0.1,  T 20, multiplier 100  -> weights ce 0.9,  tf_kd 0.1    (kdbench default)
      MobileNetV2  alpha 0.95, T 40, multiplier 1    -> weights ce 0.05, tf_kd 0.0095
      ShuffleNetV2 alpha 0.95, T 10, multiplier 1    -> weights ce 0.05, tf_kd 0.0095
  (The paper's text mentions a = 0.9 for the virtual teacher; the released code uses 0.99.)

`tf_kd_self` -- Tf-KD_self, self-training; needs_teacher = True.
  The teacher is a pre-trained network of the student's own architecture (checked: same model class and same
  parameter count, unless `require_same_architecture: false`), and the loss is KD's (loss_kd_self):
      kd    = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))   (teacher detached; batchmean)
      total = ce * CE + kd * kd
  The code computes (1 - alpha) * CE + alpha * T^2 * KL_mean * multiplier, i.e. our weights are
  ce = 1 - alpha, kd = alpha * multiplier / K. CIFAR-100 settings (experiments/kd_experiments/*_self_teacher):
      ResNet18     alpha 0.95, T 6,  multiplier 50  -> weights ce 0.05, kd 0.475   (kdbench default)
      MobileNetV2  alpha 0.95, T 20, multiplier 1   -> weights ce 0.05, kd 0.0095
      ShuffleNetV2 alpha 0.95, T 20, multiplier 1   -> weights ce 0.05, kd 0.0095
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError
from kdbench.models import count_parameters


def virtual_teacher(targets: torch.Tensor, num_classes: int, correct_prob: float) -> torch.Tensor:
    """p^d: `correct_prob` on the true class, (1 - correct_prob) / (K - 1) elsewhere; shape (B, K)."""
    if num_classes < 2:
        raise KDBenchError(f"tf_kd needs at least 2 classes, got {num_classes}")
    if not 0.0 <= correct_prob <= 1.0:
        raise KDBenchError(f"tf_kd: method.correct_prob must be in [0, 1], got {correct_prob}")
    p = torch.full((len(targets), num_classes), (1.0 - correct_prob) / (num_classes - 1), device=targets.device)
    return p.scatter(1, targets.view(-1, 1), correct_prob)


def tf_kd_reg_loss(student_logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                   correct_prob: float) -> torch.Tensor:
    """KL(softmax(p^d / T) || softmax(z_s)), summed over classes, averaged over samples (no T^2, as the code)."""
    p_d = virtual_teacher(targets, student_logits.shape[1], correct_prob)
    target = F.softmax(p_d.to(torch.float32) / temperature, dim=1)
    log_p_s = F.log_softmax(student_logits.float(), dim=1)
    return F.kl_div(log_p_s, target, reduction="batchmean")


@register_method("tf_kd")
class TfKDReg(Method):
    paper = "Yuan et al., Revisiting Knowledge Distillation via Label Smoothing Regularization (Tf-KD_reg), CVPR 2020"
    code = "yuanli2333/Teacher-free-Knowledge-Distillation my_loss_function.py"
    needs_teacher = False

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.temperature = float(cfg.temperature)
        self.correct_prob = float(cfg.correct_prob)
        if self.temperature <= 0:
            raise KDBenchError(f"tf_kd: method.temperature must be > 0, got {self.temperature}")
        virtual_teacher(torch.zeros(1, dtype=torch.long), pair.num_classes, self.correct_prob)  # validate early

    def terms(self, batch, student, teacher):
        return {"tf_kd": tf_kd_reg_loss(student["logits"], batch.targets, self.temperature, self.correct_prob)}


@register_method("tf_kd_self")
class TfKDSelf(Method):
    paper = "Yuan et al., Revisiting Knowledge Distillation via Label Smoothing Regularization (Tf-KD_self), CVPR 2020"
    code = "yuanli2333/Teacher-free-Knowledge-Distillation my_loss_function.py"
    teacher_taps = ("logits",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)  # its kd term (at method.temperature) is the base class's
        if cfg.get("require_same_architecture", True) and pair.teacher is not None:
            s, t = pair.student, pair.teacher
            n_s, n_t = count_parameters(s, trainable_only=False), count_parameters(t, trainable_only=False)
            if type(s) is not type(t) or n_s != n_t:
                raise pair.incompatible(
                    "tf_kd_self", f"self-training needs a teacher of the student's own architecture, but the teacher is "
                                  f"{type(t).__name__} with {n_t:,} parameters and the student "
                                  f"{type(s).__name__} with {n_s:,} (set "
                                  f"method.require_same_architecture=false to allow it)")
