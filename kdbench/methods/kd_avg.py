"""KD from the averaged soft predictions of a teacher ensemble: the baseline the multi-teacher papers compare with
("AVER" in Du et al. NeurIPS 2020, AE-KD, AnTuo1998/AE-KD; the teachers' averaged softmax is also the ensemble
target of MEAL-V2, szq0214/MEAL-V2).

With M teachers, p_m = softmax(z_m / T), q = softmax(z_s / T) and the ensemble's averaged soft prediction
p_bar = (1/M) sum_m p_m:

  average = probs (default):  kd = T^2 * (1/N) sum_i KL(p_bar_i || q_i)
  average = losses:           kd = T^2 * (1/M) sum_m (1/N) sum_i KL(p_m,i || q_i)

`probs` is the definition of the papers (KD from the averaged soft predictions). `losses` is what AE-KD's code runs
for its AVERAGE_LOSS baseline (helper/loops.py: the mean of one DistillKL per teacher; CA-MKD's code does the same).
The two differ by losses - probs = T^2 * (1/N) sum_i [H(p_bar_i) - (1/M) sum_m H(p_m,i)] >= 0 (H the entropy;
Jensen), which does not depend on the student: both give the student the same gradient T * (q - p_bar) / N and train
identically; only the logged value differs.
Reductions as RepDistiller's DistillKL: KL summed over classes, divided by the batch size (batchmean), times T^2.
total = ce * CE + kd * kd, with AE-KD's flags -r 1 -a 0.9 and T 4 (README; --kd_T 4) as defaults. CA-MKD's
scripts/run.sh runs its AVER baseline with -r 1 -a 1 (override method.weights.kd=1).
The teachers' logits are detached; the evaluated network is the student.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdbench.distill import register_method
from kdbench.errors import KDBenchError
from kdbench.methods.teacher_ensemble import EnsembleMethod, ensemble_logits

AVERAGES = ("probs", "losses")


def averaged_soft_targets(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """p_bar = (1/M) sum_m softmax(z_m / T) for teacher logits (M, N, C) -> (N, C)."""
    return F.softmax(teacher_logits.detach() / temperature, dim=-1).mean(0)


def kd_avg_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                average: str = "probs") -> torch.Tensor:
    """T^2 * batchmean KL(p_bar || q) (average=probs) or the mean over teachers of T^2 * batchmean KL(p_m || q)
    (average=losses, AE-KD's AVERAGE_LOSS); teacher_logits (M, N, C) are detached. See the module docstring."""
    if average not in AVERAGES:
        raise KDBenchError(f"kd_avg: method.average must be one of {list(AVERAGES)}, got '{average}'")
    z_t = teacher_logits.detach()
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = F.log_softmax(z_t / temperature, dim=-1)  # (M, N, C)
    if average == "probs":
        log_p_bar = torch.logsumexp(log_p, dim=0) - math.log(z_t.shape[0])
        return F.kl_div(log_q, log_p_bar, reduction="batchmean", log_target=True) * temperature**2
    per_teacher = [F.kl_div(log_q, lp, reduction="batchmean", log_target=True) for lp in log_p]
    return torch.stack(per_teacher).mean() * temperature**2


@register_method("kd_avg")
class KDAverage(EnsembleMethod):
    paper = "You et al., Learning from Multiple Teacher Networks, KDD 2017 (the averaged-teacher baseline)"
    code = "AnTuo1998/AE-KD (AVER baseline)"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.temperature = float(cfg.get("temperature", 4.0))
        self.average = str(cfg.get("average", "probs"))
        if self.average not in AVERAGES:
            raise KDBenchError(f"kd_avg: method.average must be one of {list(AVERAGES)}, got '{self.average}'")

    def terms(self, batch, student, teacher):
        return {"kd": kd_avg_loss(student["logits"], ensemble_logits(teacher), self.temperature, self.average)}

    def record_fields(self) -> dict:
        return {**super().record_fields(), "ensemble_target": f"mean of the teachers' softmax at T={self.temperature:g}"
                                                             f" (average={self.average})"}
