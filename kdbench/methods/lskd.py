"""Sun et al., CVPR 2024, "Logit Standardization in Knowledge Distillation" (LSKD; sunshangquan/logit-standardization-KD,
mdistiller/distillers/KD.py: `normalize` and `kd_loss` with `logit_stand`; torchdistill's LogitStdKDLoss is the same).

Each sample's logit vector is z-scored over its classes before the temperature softmax, on both sides:

    Z(z)  = (z - mean_c z) / (eps + std_c z)           std unbiased (N - 1, torch.std), eps = 1e-7 added to the std
    lskd  = T^2 * (1/B) sum_b KL( softmax(Z(z_t)/T) || softmax(Z(z_s)/T) )      (teacher detached; "batchmean")
    total = ce * CE(z_s, y) + lskd * lskd                                        (CE on the raw logits)

Code vs paper: the paper's Algorithm 1 writes the z-score with the plain standard deviation and no eps; the code
adds eps = 1e-7 to the (unbiased) std. kdbench follows the code (`unbiased: true`, `eps: 1e-7`); `unbiased: false`
gives the population std (the difference is a factor sqrt((K-1)/K) on Z, i.e. a slightly different effective T).

CIFAR-100 defaults (README and tools/train.py: `--logit-stand --base-temp 2 --kd-weight 9`): T = 2, kd weight 9, CE weight
0.1 (mdistiller's cfg default; the flags leave it). The released logs use other (T, weight) for some pairs (their file
names `kd,<teacher>,<student>,<T>,<weight>`); `lskd_per_pair` looks those up (conf/method/lskd_per_pair.yaml).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError
from kdbench.methods.common import standardize_logits  # noqa: F401  (also importable from here)


def lskd_loss(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float, eps: float = 1e-7,
              unbiased: bool = True) -> torch.Tensor:
    """T^2 * batch-mean KL(softmax(Z(z_t)/T) || softmax(Z(z_s)/T)), Z = standardize_logits; the teacher is detached."""
    log_p_s = F.log_softmax(standardize_logits(z_s, eps, unbiased) / temperature, dim=1)
    log_p_t = F.log_softmax(standardize_logits(z_t.detach(), eps, unbiased) / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


@register_method("lskd")
class LSKD(Method):
    """Term `lskd` (KD on standardised logits) next to the base class's `ce`."""
    paper = "Sun et al., Logit Standardization in Knowledge Distillation, CVPR 2024"
    code = "sunshangquan/logit-standardization-KD mdistiller/distillers/KD.py"

    teacher_taps = ("logits",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.temperature = float(cfg.temperature)
        self.eps = float(cfg.eps)
        self.unbiased = bool(cfg.unbiased)
        if self.temperature <= 0:
            raise KDBenchError(f"lskd: method.temperature must be > 0, got {self.temperature}")
        if pair.num_classes < 2:
            raise pair.incompatible("lskd", f"logit standardisation needs at least 2 classes, got {pair.num_classes}")

    def terms(self, batch, student, teacher):
        return {"lskd": lskd_loss(student["logits"], teacher["logits"], self.temperature, self.eps, self.unbiased)}
