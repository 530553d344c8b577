"""Chen, Wang & Zhang 2018, "DarkRank: Accelerating Deep Metric Learning via Cross Sample Similarities Transfer".

On the `embedding` tap (pooled penultimate vector) of both nets. Within a batch, each sample q is a query and the
other samples its candidates, scored by S(q, x) = -alpha * ||q - x||_2^beta (alpha = 3, beta = 3 as in the paper;
embeddings L2-normalised first when `normalize`). The teacher's scores rank the candidates; the student's scores
define Plackett-Luce distributions P(pi | S) = prod_i exp(S_pi(i)) / sum_{j >= i} exp(S_pi(j)).
  mode: hard  ListMLE: -log P(pi_teacher | S_student), pi_teacher = the teacher's ranking of all n-1 candidates
              (or of its top `hard_top_k` neighbours when set), averaged over queries.
  mode: soft  ListNet over permutations: the teacher's top-k neighbours (k = top_k, small), all k! orderings pi,
              KL( P(pi | S_teacher) || P(pi | S_student) ) = the permutation cross entropy minus the teacher's
              (constant) permutation entropy, averaged over queries.
total = ce * CE + darkrank * DarkRank. The paper tuned its weights against metric-learning losses on person
re-identification; there is no published CIFAR recipe, so the defaults here are ce = 1, darkrank = 1.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError

MODES = ("hard", "soft")


def darkrank_scores(x: torch.Tensor, alpha: float = 3.0, beta: float = 3.0, normalize: bool = True,
                    eps: float = 1e-12) -> torch.Tensor:
    """(N, N) scores S[q, j] = -alpha * ||x_q - x_j||^beta (diagonal included; callers skip it)."""
    x = x.flatten(1)
    if normalize:
        x = F.normalize(x, dim=1)
    sq = x.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.t()).clamp_min(eps)
    return -alpha * d2.pow(beta / 2.0)


def plackett_luce_log_prob(ordered_scores: torch.Tensor) -> torch.Tensor:
    """log P(order) for scores already arranged in the order (last dim): sum_i s_i - logsumexp(s_i, ..., s_L)."""
    tail_lse = torch.logcumsumexp(ordered_scores.flip(-1), dim=-1).flip(-1)
    return (ordered_scores - tail_lse).sum(-1)


def _teacher_order(teacher_scores: torch.Tensor) -> torch.Tensor:
    """(N, N-1) candidate indices per query, best teacher score first, the query itself excluded."""
    n = teacher_scores.shape[0]
    masked = teacher_scores.masked_fill(torch.eye(n, dtype=torch.bool, device=teacher_scores.device), float("-inf"))
    return masked.argsort(dim=1, descending=True, stable=True)[:, : n - 1]


def darkrank_hard_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, alpha: float = 3.0, beta: float = 3.0,
                       normalize: bool = True, top_k: Optional[int] = None) -> torch.Tensor:
    """ListMLE: mean over queries of -log P(teacher's ranking | student scores). top_k=None ranks all n-1 candidates."""
    s_scores = darkrank_scores(student_emb, alpha, beta, normalize)
    t_scores = darkrank_scores(teacher_emb.detach(), alpha, beta, normalize)
    order = _teacher_order(t_scores)
    if top_k is not None:
        order = order[:, :top_k]
    return -plackett_luce_log_prob(s_scores.gather(1, order)).mean()


def darkrank_soft_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, alpha: float = 3.0, beta: float = 3.0,
                       normalize: bool = True, top_k: int = 4) -> torch.Tensor:
    """Mean over queries of KL(P_t || P_s) over all k! orderings of the teacher's top-k neighbours."""
    s_scores = darkrank_scores(student_emb, alpha, beta, normalize)
    t_scores = darkrank_scores(teacher_emb.detach(), alpha, beta, normalize)
    k = min(top_k, s_scores.shape[0] - 1)
    if k < 2:  # fewer than two neighbours (a batch of 1 or 2): a single ordering, nothing to transfer
        return s_scores.sum() * 0.0
    order = _teacher_order(t_scores)[:, :k]  # (N, k)
    perms = torch.tensor(list(itertools.permutations(range(k))), dtype=torch.long, device=order.device)  # (k!, k)
    cand = order[:, perms]  # (N, k!, k): candidate indices in each ordering
    rows = torch.arange(order.shape[0], device=order.device)[:, None, None]
    log_p_s = plackett_luce_log_prob(s_scores[rows, cand])  # (N, k!)
    log_p_t = plackett_luce_log_prob(t_scores[rows, cand])
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()


@register_method("darkrank")
class DarkRank(Method):
    paper = ("Chen, Wang & Zhang, DarkRank: Accelerating Deep Metric Learning via Cross Sample Similarities Transfer, "
             "AAAI 2018")
    code = "none released; from the paper"
    student_taps = ("embedding",)
    teacher_taps = ("embedding",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.mode = str(cfg.get("mode", "hard"))
        if self.mode not in MODES:
            raise KDBenchError(f"darkrank: method.mode must be one of {MODES}, got '{self.mode}'")
        self.alpha = float(cfg.get("alpha", 3.0))
        self.beta = float(cfg.get("beta", 3.0))
        self.normalize = bool(cfg.get("normalize", True))
        self.top_k = int(cfg.get("top_k", 4))
        hard_top_k = cfg.get("hard_top_k", None)
        self.hard_top_k = None if hard_top_k is None else int(hard_top_k)
        if self.top_k < 2 or math.factorial(self.top_k) > 40320:
            raise KDBenchError(f"darkrank: method.top_k must be in 2..8 (k! orderings are enumerated), got {self.top_k}")

    def terms(self, batch, student, teacher):
        s, t = student["embedding"], teacher["embedding"]
        if self.mode == "hard":
            rank = darkrank_hard_loss(s, t, self.alpha, self.beta, self.normalize, self.hard_top_k)
        else:
            rank = darkrank_soft_loss(s, t, self.alpha, self.beta, self.normalize, self.top_k)
        return {"darkrank": rank}
