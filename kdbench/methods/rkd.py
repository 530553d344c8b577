"""Park et al. 2019, "Relational Knowledge Distillation" (RepDistiller `rkd`, mdistiller RKD).

Features: the pooled penultimate vectors (`embedding`). Distance term: pairwise Euclidean distances
d_ij = sqrt(clamp(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, 1e-12)) with a zero diagonal, each side divided by the mean of its
own positive entries, compared with SmoothL1 (beta 1, mean over N^2). Angle term: for every anchor i,
u_ij = normalize(e_j - e_i), A_ijk = u_ij . u_ik, SmoothL1 mean over N^3. RD/MD: 25 * distance + 50 * angle with
an outer weight 1 (the paper's own values are 1 and 2); here the two are separate terms weighted 25 and 50.
"""
import torch
import torch.nn.functional as F

from kdbench.distill import Method, register_method


def pairwise_distances(e: torch.Tensor, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    e = e.reshape(e.shape[0], -1)
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=d.dtype))


def _normalised_distances(e: torch.Tensor) -> torch.Tensor:
    d = pairwise_distances(e)
    return d / d[d > 0].mean()


def rkd_distance_loss(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        t_d = _normalised_distances(e_t.detach())
    return F.smooth_l1_loss(_normalised_distances(e_s), t_d)


def _angles(e: torch.Tensor) -> torch.Tensor:
    e = e.reshape(e.shape[0], -1)
    u = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # u[i, j] = normalize(e_j - e_i)
    return torch.bmm(u, u.transpose(1, 2)).reshape(-1)  # A[i, j, k] = u_ij . u_ik


def rkd_angle_loss(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        t_a = _angles(e_t.detach())
    return F.smooth_l1_loss(_angles(e_s), t_a)


def rkd_loss(e_s: torch.Tensor, e_t: torch.Tensor, w_distance: float = 25.0, w_angle: float = 50.0) -> torch.Tensor:
    """RD/MD's combined RKD loss: w_distance * distance + w_angle * angle."""
    return w_distance * rkd_distance_loss(e_s, e_t) + w_angle * rkd_angle_loss(e_s, e_t)


@register_method("rkd")
class RKD(Method):
    paper = "Park et al., Relational Knowledge Distillation, CVPR 2019"
    code = "HobbitLong/RepDistiller distiller_zoo/RKD.py; megvii-research/mdistiller RKD"
    student_taps = ("embedding",)
    teacher_taps = ("embedding",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)

    def terms(self, batch, student, teacher):
        e_s, e_t = student["embedding"], teacher["embedding"]
        return {"rkd_distance": rkd_distance_loss(e_s, e_t),
                "rkd_angle": rkd_angle_loss(e_s, e_t)}
