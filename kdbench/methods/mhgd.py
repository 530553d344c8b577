"""Lee & Song (BMVC 2019), "Graph-based Knowledge Distillation by Multi-head Attention Network" (MHGD; the authors'
TensorFlow code sseung0703/KD_methods_with_TF `nets/Relation.py` MHGD, `nets/SVP.py` SVD_eid / Align_rsv,
`op_util.py` Optimizer_w_MHGD, `train_w_distill.py`).

Per stage map f (N, C, H, W) of each net, viewed as N matrices (H*W, C):
  compression  V = the leading right singular vectors of each sample's matrix, L2-normalised over C: one for the
               teacher, four for the student, of which the one most aligned with the teacher's (largest |cos|) is
               kept, sign-corrected (Align_rsv). Both nets need equal widths per stage (the student's and teacher's
               singular vectors are compared).
  graph        between consecutive levels (l-1, l), a multi-head attention G = [S_h R_h^T]_h, (H, N, N) with
               S = BN(Linear(V_l -> D2 * H)), R = BN(Linear(V_{l-1} -> D2 * H)) reshaped (N, D2, H), D2 = (C_l +
               C_{l-1}) // 2, H = 8 heads: an instance-by-instance graph per head.
  MHA stage    the attention modules and an estimator are first trained on the teacher alone (`mha` stage, the code's
               40 init epochs): the estimator predicts V_l from V_{l-1} through the softmaxed graph (random half of
               the heads dropped per sample): V^_l = normalize(fc1(G' relu(bn0(fc0(V_{l-1}))))), loss
               sum_l mean_n (1 - <V^_l, V_l>); weight decay 5e-4 on those modules (the stage's SGD).
  mhgd         with the attention modules frozen (eval mode): sum_l sum_{h, n} KL(softmax(tanh(G_S)) || softmax(
               tanh(G_T))) over the rows of each head's graph -- the code's kld_loss(G_S, G_T) puts the STUDENT graph
               first (a reverse KL) and sums (no mean); kdbench keeps both.
Optimisation (code): the distillation gradient of each student parameter is clipped to the norm of its CE gradient
times sigmoid(epoch_0 - init_epoch) (0.5 in the first epoch after the MHA stage, ~1 from the fifth), then added to
the CE and weight-decay gradients. kdbench's train_step does the same (option clip_to_ce, default true: one backward
per part, then the run's optimizer steps on the summed gradient; a DOT or max-norm policy is bypassed when on);
clip_to_ce false sums the weighted terms plainly.
SVD: torch.linalg.svd with autograd on the student side (the code writes its own SVD gradient, equal in exact
arithmetic); non-finite singular vectors are zeroed as the code's removenan does. Code recipe (ResNets of equal
widths, 40 + 100 epochs, batch 128, Nesterov lr 0.1) is the experiment's to set.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, Stage, register_method
from kdbench.methods.common import stage_pairs


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def leading_right_singular_vectors(f: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, k): each sample's top-k right singular vectors of its (H*W, C) matrix, L2-normalised over C."""
    x = f.flatten(2).transpose(1, 2)  # (N, HW, C)
    _, _, vh = torch.linalg.svd(x.float(), full_matrices=False)
    v = _finite(vh.transpose(1, 2)[:, :, :k])
    return F.normalize(v, dim=1)


def align_to_teacher(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """(N, C): the student vector (of k) with the largest |cos| to the teacher's, times the sign of that cosine."""
    cos = torch.bmm(v_s.transpose(1, 2), v_t).squeeze(2)  # (N, k)
    best = cos.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(cos.gather(1, best))
    picked = v_s.gather(2, best.unsqueeze(1).expand(-1, v_s.shape[1], 1)).squeeze(2)
    return picked * sign


class AttentionHead(nn.Module):
    """G[h] = S_h R_h^T with S = BN(Linear(d_key -> dim * heads)), R = BN(Linear(d_query -> dim * heads)), each
    reshaped (N, dim, heads) as the code does; -> (heads, N, N)."""

    def __init__(self, d_key: int, d_query: int, dim: int, heads: int):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.sender = nn.Sequential(nn.Linear(d_key, dim * heads), nn.BatchNorm1d(dim * heads))
        self.receiver = nn.Sequential(nn.Linear(d_query, dim * heads), nn.BatchNorm1d(dim * heads))

    def forward(self, key, query):
        n = key.shape[0]
        s = self.sender(key).view(n, self.dim, self.heads).permute(2, 0, 1)  # (H, N, dim)
        r = self.receiver(query).view(n, self.dim, self.heads).permute(2, 1, 0)  # (H, dim, N)
        return torch.bmm(s, r)


class Estimator(nn.Module):
    """V^_l from V_{l-1} through the softmaxed graph: normalize(fc1(concat_h G'_h relu(bn0(fc0(x)))))."""

    def __init__(self, d_in: int, d_out: int, heads: int):
        super().__init__()
        mid = (d_in + d_out) // 2
        self.heads = heads
        self.fc0 = nn.Linear(d_in, mid)
        self.bn0 = nn.BatchNorm1d(mid)
        self.fc1 = nn.Linear(mid * heads, d_out)
        nn.init.zeros_(self.fc1.bias)

    def forward(self, x, graph, keep=None):
        heads, n, _ = graph.shape
        g = torch.softmax(graph, dim=-1)
        if keep is not None:
            g = g * keep
        h = F.relu(self.bn0(self.fc0(x)))  # (N, mid)
        h = torch.matmul(g, h)  # (H, N, mid)
        return F.normalize(self.fc1(h.transpose(0, 1).reshape(n, -1)), dim=-1)


def drop_heads(heads: int, n: int, generator=None, device=None) -> torch.Tensor:
    """(H, N, 1) mask keeping head h for sample n where its Gaussian noise exceeds the mean over the heads."""
    noise = torch.randn(heads, n, 1, generator=generator, device=device)
    return (noise - noise.mean(0, keepdim=True) > 0).float()


def graph_kl(g_first: torch.Tensor, g_second: torch.Tensor) -> torch.Tensor:
    """sum over heads and rows of KL(softmax(g_first) || softmax(g_second)) (the code's kld_loss, a sum)."""
    p = F.softmax(g_first, dim=-1)
    return (p * (F.log_softmax(g_first, dim=-1) - F.log_softmax(g_second, dim=-1))).sum()


def mhgd_loss(graphs_s, graphs_t, reverse: bool = True) -> torch.Tensor:
    """sum_l graph_kl(tanh(G_S), tanh(G_T)) (reverse, the code) or graph_kl(tanh(G_T), tanh(G_S))."""
    total = 0.0
    for g_s, g_t in zip(graphs_s, graphs_t, strict=True):
        a, b = torch.tanh(g_s), torch.tanh(g_t.detach())
        total = total + (graph_kl(a, b) if reverse else graph_kl(b, a))
    return total


def estimator_loss(v_hat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (1 - (v_hat * v.detach()).sum(-1)).mean()


def clipped_sum(g_task, g_dist, ramp: float):
    """g_task + g_dist rescaled to norm <= ||g_task|| * ramp (tf.clip_by_norm per parameter; a parameter without a
    task gradient gets its distillation gradient clipped to 0, one without a distillation gradient g_task alone)."""
    if g_dist is None:
        return None if g_task is None else g_task.clone()
    limit = g_task.norm() * ramp if g_task is not None else torch.zeros((), device=g_dist.device)
    norm = g_dist.norm()
    scale = torch.where(norm > limit, limit / norm.clamp_min(1e-12), torch.ones_like(norm))
    return g_dist * scale if g_task is None else g_task + g_dist * scale


def ce_ramp(epoch: int) -> float:
    """sigmoid(epoch_0 - init_epoch) of the code for kdbench's 1-indexed main epochs: 1 / (1 + exp(-(epoch - 1)))."""
    s = 1.0 / (1.0 + math.exp(-(epoch - 1)))
    return 1.0 if s > 1 - 1e-8 else s


@register_method("mhgd")
class MHGD(Method):
    paper = "Lee & Song, Graph-based Knowledge Distillation by Multi-head Attention Network, BMVC 2019"
    code = "sseung0703/KD_methods_with_TF"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        if pair.teacher is None:
            raise pair.incompatible(self.method_name, "it needs a teacher")
        self.pairs = stage_pairs(pair, self.method_name, align="first")
        if len(self.pairs) < 2:
            raise pair.incompatible(self.method_name, "its graphs link consecutive stages: it needs two or more")
        for s, t in self.pairs:
            if pair.student_shapes[s][0] != pair.teacher_shapes[t][0]:
                raise pair.incompatible(self.method_name, f"it compares singular vectors over channels, but student {s} "
                                                          f"has {pair.student_shapes[s][0]} channels and teacher {t} "
                                                          f"{pair.teacher_shapes[t][0]}")
        self.student_taps = tuple(s for s, _ in self.pairs)
        self.teacher_taps = tuple(t for _, t in self.pairs)
        self.heads = int(cfg.get("heads", 8))
        self.student_vectors = int(cfg.get("student_vectors", 4))
        self.reverse_kl = bool(cfg.get("reverse_kl", True))
        self.clip_to_ce = bool(cfg.get("clip_to_ce", True))
        self.stage_epochs = int(cfg.get("stage_epochs", 40))
        stage_lr = cfg.get("stage_lr")
        self.stage_lr = float(pair.lr if stage_lr is None else stage_lr)
        widths = [pair.teacher_shapes[t][0] for t in self.teacher_taps]
        self.attention = nn.ModuleList(AttentionHead(widths[i], widths[i - 1], (widths[i] + widths[i - 1]) // 2,
                                                     self.heads) for i in range(1, len(widths)))
        self.estimators = nn.ModuleList(Estimator(widths[i - 1], widths[i], self.heads) for i in range(1, len(widths)))

    def trainable_parameters(self):
        return []  # the MHA modules are trained in their stage and frozen afterwards

    def teacher_vectors(self, teacher):
        return [leading_right_singular_vectors(teacher[t].detach(), 1).squeeze(2) for t in self.teacher_taps]

    def student_vectors_aligned(self, student, v_t):
        return [align_to_teacher(leading_right_singular_vectors(student[s], self.student_vectors), v.unsqueeze(2))
                for s, v in zip(self.student_taps, v_t)]

    def terms(self, batch, student, teacher):
        self.attention.eval()
        v_t = self.teacher_vectors(teacher)
        v_s = self.student_vectors_aligned(student, v_t)
        with torch.no_grad():
            g_t = [att(v_t[i], v_t[i - 1]) for i, att in enumerate(self.attention, start=1)]
        g_s = [att(v_s[i], v_s[i - 1]) for i, att in enumerate(self.attention, start=1)]
        return {"mhgd": mhgd_loss(g_s, g_t, self.reverse_kl)}

    def mha_loss(self, batch, student, teacher) -> torch.Tensor:
        """The MHA stage: the estimators predict each level's teacher vector from the previous level's."""
        self.attention.train()
        self.estimators.train()
        v_t = self.teacher_vectors(teacher)
        total = 0.0
        for i, (att, est) in enumerate(zip(self.attention, self.estimators), start=1):
            graph = att(v_t[i], v_t[i - 1])
            keep = drop_heads(self.heads, graph.shape[1], device=graph.device)
            total = total + estimator_loss(est(v_t[i - 1], graph, keep), v_t[i])
        return total

    def stages(self, student, teacher):
        if self.stage_epochs <= 0:
            return []
        return [Stage("mha", self.stage_epochs, self.stage_lr, [*self.attention.parameters(), *self.estimators.parameters()],
                      self.mha_loss, teacher_taps=self.teacher_taps, uses_student=False)]

    def train_step(self, batch, step):
        if not self.clip_to_ce:
            return super().train_step(batch, step)
        with step.autocast():
            total, terms = self.forward_loss(batch, step)
        weights = self.term_weights(step.epoch)
        task = sum(weights[k] * v for k, v in terms.items() if k == "ce" and weights[k] != 0)
        distill = sum(weights[k] * v for k, v in terms.items() if k != "ce" and weights[k] != 0)
        params = [p for p in step.run.student.parameters() if p.requires_grad]
        g_task = torch.autograd.grad(task, params, retain_graph=True, allow_unused=True) if torch.is_tensor(task) \
            else [None] * len(params)
        g_dist = torch.autograd.grad(distill, params, allow_unused=True) if torch.is_tensor(distill) and \
            distill.requires_grad else [None] * len(params)
        ramp = ce_ramp(step.epoch)
        optimizer = step.run.step.optimizer
        optimizer.zero_grad(set_to_none=True)
        for p, gc, gd in zip(params, g_task, g_dist):
            p.grad = clipped_sum(gc, gd, ramp)
        optimizer.step()
        return total, terms

    def record_fields(self):
        return {"evaluated_head": "student", "stage_trained": ["mha_attention", "mha_estimators"],
                "clip_to_ce": self.clip_to_ce}
