"""Du et al., NeurIPS 2020, "Agree to Disagree: Adaptive Ensemble Knowledge Distillation in Gradient Space" (AE-KD;
code AnTuo1998/AE-KD, helper/loops.py train_distill_Multi_teacher with --ensemble_method AEKD, helper/optimization.py
find_optimal_svm).

Each teacher m gives a KD objective L_m = T^2 * (1/N) sum_i KL(p_m,i || q_i) (p = softmax(z / T), the teachers'
logits detached; RepDistiller's DistillKL). Instead of their average (kd_avg), the student follows the weighted sum
sum_m alpha_m L_m whose weights solve the multiple-gradient problem in the space of the student's logits, with a
tolerance C that lets teachers disagree:

    alpha = argmin_a  1/2 || sum_m a_m g_m ||^2   s.t.  sum_m a_m = 1,  0 <= a_m <= c,       c = clip(C, 1/M, 1)

g_m = dL_m / dz_s = T (softmax(z_s / T) - softmax(z_m / T)) / N, an (N, C) matrix per teacher. As the code does, the
problem is the dual of a one-class nu-SVM on the Gram matrix G_mn = <v_m, v_n>, solved with scikit-learn's libsvm
(OneClassSVM(kernel="precomputed", nu, tol=1e-6)) with nu = 1 / (C M) clipped to [1/M, 1]; alpha = dual_coef / (M nu)
(so sum alpha = 1 and alpha_m <= 1 / (M nu) = c). C <= 1/M gives every teacher 1/M (the average, kd_avg; returned
directly, as libsvm cannot fit nu = 1); C >= 1 the unconstrained min-norm point (MGDA); one teacher gets weight 1.
The weights are constants of the step (no gradient flows through them).

What v_m is (option `granularity`):
  - batch (default, the code): v_m = the batch mean of g_m (a C-vector; find_optimal_svm averages the logit gradients
    over the batch before the Gram matrix): one weight vector alpha per batch, and aekd = sum_m alpha_m L_m.
  - sample: one problem per sample i on v_m = g_m,i, giving per-sample teacher weights alpha_i and
    aekd = T^2 (1/N) sum_i sum_m alpha_i,m KL(p_m,i || q_i). (The paper could not be read here to confirm which of the
    two it states; the code solves one problem per batch.)
Option `normalize_gradients` (the code's --svm_norm, off by default): the v_m are scaled to unit norm before the Gram
matrix and the solution is mapped back, alpha_m <- (alpha_m / ||v_m||) / sum_n (alpha_n / ||v_n||).

Code vs paper (option `rescale_gram`, default false = the code): libsvm's stopping tolerance (1e-6) is absolute, and the
code hands it the raw Gram matrix of the batch-mean logit gradients T (q - p) / N, whose entries are of that order or
far below it (about 1e-8 to 1e-4, shrinking as the student approaches its teachers). libsvm then stops early: near, or
for the smallest G exactly at, its starting point -- alpha = c for the first floor(1/c) teachers, the rest of the mass
on the next, 0 for the others, in teacher order (0.6, 0.4, 0 for three teachers at C = 0.6) -- rather than at the
min-norm point of the problem above (the MGDA problem with a tolerance the paper describes). rescale_gram: true
divides G by its largest diagonal entry first (the argmin does not change with the scale of G), which gives the
min-norm weights to ~1e-8.

total = ce * CE + aekd * aekd with the README's flags -r 1 -a 0.9 (-b 0 for logit KD), -C 0.6, --kd_T 4. The code's
CIFAR-100 run (train_student.sh): three teachers, 240 epochs, batch 64, SGD 0.05 (nesterov), wd 5e-4, lr x0.1 at
150/180/210. The evaluated network is the student.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdbench.distill import register_method
from kdbench.errors import KDBenchError
from kdbench.methods.teacher_ensemble import EnsembleMethod, ensemble_logits

GRANULARITIES = ("batch", "sample")


def logit_gradients(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """g_m = d/dz_s [T^2 * batchmean KL(softmax(z_m/T) || softmax(z_s/T))] = T (softmax(z_s/T) - softmax(z_m/T)) / N,
    for teacher logits (M, N, C) -> (M, N, C); no gradient flows through the result."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp32 at least (bf16 autocast logits)
    z_s = student_logits.detach().to(dtype)
    q = F.softmax(z_s / temperature, dim=1)
    p = F.softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    return temperature * (q.unsqueeze(0) - p) / z_s.shape[0]


def svm_nu(n_teachers: int, tolerance: float) -> float:
    """The code's nu = 1 / (C M), clipped to [1/M, 1] (so the weight bound 1 / (M nu) is C clipped to [1/M, 1])."""
    return float(min(max(1.0 / (tolerance * n_teachers), 1.0 / n_teachers), 1.0))


def min_norm_weights(gram: np.ndarray, tolerance: float) -> np.ndarray:
    """argmin_a 1/2 a^T G a s.t. sum a = 1, 0 <= a <= clip(C, 1/M, 1), via libsvm's one-class nu-SVM dual on the
    precomputed kernel G (scikit-learn OneClassSVM, tol 1e-6, as find_optimal_svm): a = dual_coef / (M nu)."""
    from sklearn.svm import OneClassSVM

    m = gram.shape[0]
    nu = svm_nu(m, tolerance)
    if nu >= 1.0:  # C <= 1/M: every weight is held at its bound 1/M (libsvm has no free variable to fit then)
        return np.full(m, 1.0 / m)
    svm = OneClassSVM(kernel="precomputed", nu=nu, tol=1e-6).fit(np.asarray(gram, dtype=np.float64))
    alpha = np.zeros(m)
    alpha[svm.support_] = svm.dual_coef_[0] / (m * nu)
    return alpha


def ae_kd_weights(vectors: torch.Tensor, tolerance: float = 0.6, normalize: bool = False,
                  rescale_gram: bool = False) -> torch.Tensor:
    """The teachers' weights (M,) for their gradient vectors (M, D): min-norm point of the capped simplex (see
    min_norm_weights) on G = V V^T; with `normalize` the vectors are unit-scaled first and the weights mapped back
    (--svm_norm); with `rescale_gram` G is divided by its largest diagonal entry before libsvm sees it."""
    v = vectors.detach().to("cpu", torch.float64).reshape(vectors.shape[0], -1)
    norms = v.norm(dim=1).clamp_min(1e-300)
    if normalize:
        v = v / norms[:, None]
    gram = v @ v.T
    if rescale_gram:
        gram = gram / gram.diagonal().max().clamp_min(1e-300)
    alpha = torch.from_numpy(min_norm_weights(gram.numpy(), tolerance))
    if normalize:
        alpha = alpha / norms
        alpha = alpha / alpha.sum()
    return alpha.to(vectors.device, torch.float32)


def per_sample_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_m,i || q_i) summed over classes, per teacher and sample: (M, N); teacher side detached."""
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q.unsqueeze(0))).sum(-1) * temperature**2


def ae_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
               tolerance: float = 0.6, granularity: str = "batch", normalize: bool = False,
               rescale_gram: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(aekd, weights): batch -> weights (M,) and sum_m alpha_m L_m; sample -> weights (N, M) and
    (1/N) sum_i sum_m alpha_i,m T^2 KL_m,i. Teacher logits (M, N, C) are detached; see the module docstring."""
    if granularity not in GRANULARITIES:
        raise KDBenchError(f"ae_kd: method.granularity must be one of {list(GRANULARITIES)}, got '{granularity}'")
    grads = logit_gradients(student_logits, teacher_logits, temperature)  # (M, N, C)
    kl = per_sample_kd(student_logits, teacher_logits, temperature)  # (M, N)
    n = student_logits.shape[0]
    if granularity == "batch":
        weights = ae_kd_weights(grads.mean(1), tolerance, normalize, rescale_gram)
        return (weights.to(kl.dtype)[:, None] * kl).sum() / n, weights
    weights = torch.stack([ae_kd_weights(grads[:, i], tolerance, normalize, rescale_gram) for i in range(n)])  # (N, M)
    return (weights.to(kl.dtype).T * kl).sum() / n, weights


@register_method("ae_kd")
class AEKD(EnsembleMethod):
    paper = "Du et al., Agree to Disagree: Adaptive Ensemble Knowledge Distillation in Gradient Space, NeurIPS 2020"
    code = "AnTuo1998/AE-KD"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.temperature = float(cfg.get("temperature", 4.0))
        self.tolerance = float(cfg.get("tolerance", 0.6))
        self.granularity = str(cfg.get("granularity", "batch"))
        self.normalize_gradients = bool(cfg.get("normalize_gradients", False))
        self.rescale_gram = bool(cfg.get("rescale_gram", False))
        if self.granularity not in GRANULARITIES:
            raise KDBenchError(f"ae_kd: method.granularity must be one of {list(GRANULARITIES)}, got "
                               f"'{self.granularity}'")
        if self.tolerance <= 0:
            raise KDBenchError(f"ae_kd: method.tolerance (C) must be > 0, got {self.tolerance}")
        self.last_weights: torch.Tensor | None = None  # the latest step's teacher weights (diagnostics)

    def terms(self, batch, student, teacher):
        loss, self.last_weights = ae_kd_loss(student["logits"], ensemble_logits(teacher), self.temperature,
                                             self.tolerance, self.granularity, self.normalize_gradients,
                                             self.rescale_gram)
        return {"aekd": loss}

    def record_fields(self) -> dict:
        return {**super().record_fields(),
                "teacher_weighting": f"AE-KD min-norm weights per {self.granularity} (tolerance C={self.tolerance:g}, "
                                     f"weight bound {min(max(self.tolerance, 1 / self.n_teachers), 1.0):g}, "
                                     f"{'rescaled' if self.rescale_gram else 'raw'} Gram matrix)"}
