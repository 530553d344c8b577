"""Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer" (RD `pkt`, MD PKT).

Features: the pooled penultimate vectors (`embedding`). e_hat = e / (|e|_2 + 1e-7) (NaNs -> 0); cosine similarities
S = e_hat e_hat^T mapped to [0, 1] by (S + 1) / 2 and row-normalised into conditional probabilities P (diagonal
included); loss = mean over all N^2 entries of P_t * log((P_t + 1e-7) / (P_s + 1e-7)), a mean rather than a per-row
KL, hence the large weight 30000 (RD, MD and torchdistill agree).
"""
import torch

from kdbench.distill import Method, register_method


def pkt_probabilities(e: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    e = e.reshape(e.shape[0], -1)
    e = e / (e.pow(2).sum(1, keepdim=True).sqrt() + eps)
    e = torch.nan_to_num(e, nan=0.0)
    sim = (e @ e.t() + 1.0) / 2.0
    return sim / sim.sum(1, keepdim=True)


def pkt_loss(e_s: torch.Tensor, e_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    p_s = pkt_probabilities(e_s, eps)
    p_t = pkt_probabilities(e_t.detach(), eps)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


@register_method("pkt")
class PKT(Method):
    paper = "Passalis & Tefas, Learning Deep Representations with Probabilistic Knowledge Transfer, ECCV 2018"
    code = "HobbitLong/RepDistiller distiller_zoo/PKT.py; megvii-research/mdistiller PKT"
    student_taps = ("embedding",)
    teacher_taps = ("embedding",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)

    def terms(self, batch, student, teacher):
        return {"pkt": pkt_loss(student["embedding"], teacher["embedding"])}
