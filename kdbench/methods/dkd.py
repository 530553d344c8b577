"""Zhao et al. 2022, "Decoupled Knowledge Distillation" (mdistiller DKD; not in RepDistiller).

With p = softmax(z / T) (T = 4):
  TCKD = T^2 * (1/N) sum_i KL(b_t || b_s), b = [p_target, sum_{c != target} p_c] (binary; log b_s without eps)
  NCKD = T^2 * (1/N) sum_i KL(p^_t || p^_s), p^ = softmax over the non-target classes, computed as mdistiller does
         by subtracting 1000 from z/T at the target class (student side via log_softmax).
total = ce * CE + min(epoch / 20, 1) * (tckd * TCKD + nckd * NCKD), with ce 1, tckd (alpha) 1, nckd (beta) 8.
The warm-up scales both DKD terms per epoch (1-indexed; term_weights), CE is not warmed up.

Option `logit_standardization` (default false): LSKD's DKD+LS (Sun et al. CVPR 2024, logit-standardization-KD
`mdistiller/distillers/DKD.py` `dkd_loss`): both logits are Z-scored (kdbench.methods.common.standardize_logits) before
the TCKD/NCKD split, the -1000 target trick and the sum / N reduction unchanged; CE keeps the raw logits. The LSKD
repo's CIFAR-100 flags (--logit-stand --base-temp 2 --kd-weight 9) give temperature 2, tckd (alpha) 1 * 9 = 9, nckd
(beta) 8 * 9 = 72, ce 1 and the 20-epoch warm-up; they are not the defaults here (set them in the run).
"""
import torch
import torch.nn.functional as F

from kdbench.distill import Method, register_method
from kdbench.methods.common import standardize_logits, warmup_factor


def _target_mask(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(logits).scatter_(1, target.view(-1, 1), 1.0)


def tckd_loss(z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    gt = _target_mask(z_s, target)
    p_s = F.softmax(z_s / temperature, dim=1)
    p_t = F.softmax(z_t.detach() / temperature, dim=1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], dim=1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], dim=1)
    return F.kl_div(torch.log(b_s), b_t, reduction="sum") * temperature**2 / z_s.shape[0]


def nckd_loss(z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    gt = _target_mask(z_s, target)
    p_t = F.softmax(z_t.detach() / temperature - 1000.0 * gt, dim=1)
    log_p_s = F.log_softmax(z_s / temperature - 1000.0 * gt, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="sum") * temperature**2 / z_s.shape[0]


def dkd_loss(z_s, z_t, target, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD (no warm-up)."""
    return alpha * tckd_loss(z_s, z_t, target, temperature) + beta * nckd_loss(z_s, z_t, target, temperature)


@register_method("dkd")
class DKD(Method):
    paper = "Zhao et al., Decoupled Knowledge Distillation, CVPR 2022"
    code = "megvii-research/mdistiller distillers/DKD.py"
    teacher_taps = ("logits",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.temperature = float(cfg.get("temperature", 4.0))
        self.warmup_epochs = float(cfg.get("warmup_epochs", 20))
        self.logit_standardization = bool(cfg.get("logit_standardization", False))

    def terms(self, batch, student, teacher):
        z_s, z_t, y = student["logits"], teacher["logits"], batch.targets
        if self.logit_standardization:
            z_s, z_t = standardize_logits(z_s), standardize_logits(z_t.detach())
        return {"tckd": tckd_loss(z_s, z_t, y, self.temperature),
                "nckd": nckd_loss(z_s, z_t, y, self.temperature)}

    def term_weights(self, epoch):
        ramp = warmup_factor(epoch, self.warmup_epochs)
        return {k: (v * ramp if k in ("tckd", "nckd") else v) for k, v in self.weights.items()}
