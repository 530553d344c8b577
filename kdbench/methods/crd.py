"""Tian, Krishnan & Isola 2020, "Contrastive Representation Distillation" (RepDistiller `crd`, mdistiller CRD).

Features: the pooled `embedding` vectors, each mapped by its own trainable head Linear(dim -> 128) + L2
normalisation (65,792 extra parameters for resnet32x4 -> resnet8x4). Two memory banks of n_data x 128 (buffers,
on the training device, checkpointed): bank_s holds student embeddings, bank_t teacher embeddings, initialised
uniform in +-1/sqrt(128/3).

Per sample the K+1 contrast indices are [positive, K negatives]. Negatives are drawn ON THE DEVICE from the
samples of the other classes (per-class index tensors built from the training labels): without replacement, or
with replacement for a class whose other-class pool is smaller than K (RD's rule). Mode `exact`: the positive is
the sample itself; `relax`: a random sample of the same class. Scores with T = 0.07:
  student-anchored  exp(bank_t[idx] . e_s / T)       teacher-anchored  exp(bank_s[idx] . e_t / T)
(bank rows detached). Each direction is divided by its normalising constant Z = mean(first-batch scores) * n_data,
fixed once and kept in a buffer (so a resumed run keeps it). NCE loss per direction with Pn = 1/n_data, M = K:
  L = -(1/N) [sum_i log(P_i0 / (P_i0 + M Pn + eps)) + sum_ik log(M Pn / (P_ik + M Pn + eps))],  eps = 1e-7,
CRD = L_student-anchored + L_teacher-anchored. After the scores, under no_grad, the banks' rows of the batch's own
indices move by momentum 0.5 towards the new embeddings and are re-normalised. Benchmark: CE 1 + 0.8 CRD
(CRD+KD: also 1.0 * KD, T 4; config crd_kd).
"""
import math

import torch
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.distributed import all_gather_cat, all_sum_tensor
from kdbench.methods.common import flat_dim


def nce_loss(probs: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """RD's ContrastLoss on (N, K+1) normalised scores whose column 0 is the positive."""
    n, m = probs.shape[0], probs.shape[1] - 1
    noise = m / float(n_data)
    log_d1 = torch.log(probs[:, 0] / (probs[:, 0] + noise + eps))
    log_d0 = torch.log(noise / (probs[:, 1:] + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / n


def contrast_scores(bank: torch.Tensor, anchor: torch.Tensor, idx: torch.Tensor, temperature: float) -> torch.Tensor:
    """exp(bank[idx_ik] . anchor_i / T) -> (N, K+1); bank rows detached; at least fp32 (also under autocast)."""
    dtype = torch.promote_types(torch.promote_types(anchor.dtype, bank.dtype), torch.float32)
    with torch.autocast(anchor.device.type, enabled=False):
        weights = bank[idx].detach().to(dtype)  # (N, K+1, D)
        return torch.exp(torch.bmm(weights, anchor.to(dtype).unsqueeze(2)).squeeze(2) / temperature)


@torch.no_grad()
def momentum_update(bank: torch.Tensor, idx: torch.Tensor, embeddings: torch.Tensor, momentum: float) -> None:
    """bank[idx] <- normalize(momentum * bank[idx] + (1 - momentum) * e), in place."""
    rows = bank.index_select(0, idx) * momentum + embeddings.detach().to(bank.dtype) * (1 - momentum)
    bank.index_copy_(0, idx, rows / rows.pow(2).sum(1, keepdim=True).sqrt())


class ContrastSampler(nn.Module):
    """Draws [positive, K negatives] per sample on the device from per-class index tensors (non-persistent buffers)."""

    def __init__(self, labels: torch.Tensor, k: int, mode: str = "exact"):
        super().__init__()
        if mode not in ("exact", "relax"):
            raise ValueError(f"CRD mode must be 'exact' or 'relax', got '{mode}'")
        labels = labels.long().cpu()
        order = torch.argsort(labels, stable=True)
        classes = int(labels.max()) + 1 if len(labels) else 0
        count = torch.bincount(labels, minlength=classes)
        start = torch.cumsum(count, 0) - count
        self.k, self.mode, self.n = int(k), mode, len(labels)
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("order", order, persistent=False)  # dataset indices sorted by class
        self.register_buffer("start", start, persistent=False)  # first position of each class in `order`
        self.register_buffer("count", count, persistent=False)  # samples per class

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(self.labels.device).long()
        n, k = len(idx), self.k
        y = self.labels[idx]
        start, count = self.start[y], self.count[y]
        if self.mode == "exact":
            pos = idx
        else:
            offset = (torch.rand(n, device=idx.device) * count).long().clamp_max(count - 1)
            pos = self.order[start + offset]
        # without replacement: the K smallest of uniform keys, same-class samples pushed past every other key
        keys = torch.rand(n, self.n, device=idx.device)
        keys.masked_fill_(self.labels.unsqueeze(0) == y.unsqueeze(1), 2.0)
        neg = keys.topk(k, dim=1, largest=False, sorted=False).indices
        pool = self.n - count
        short = pool < k  # RD: with replacement when K exceeds the class's negative pool
        if bool(short.any()):
            p = (torch.rand(n, k, device=idx.device) * pool.unsqueeze(1)).long().clamp_max((pool - 1).unsqueeze(1))
            p = p + (p >= start.unsqueeze(1)).long() * count.unsqueeze(1)  # skip the own-class block of `order`
            neg = torch.where(short.unsqueeze(1), self.order[p], neg)
        return torch.cat([pos.unsqueeze(1), neg], dim=1)


class Embed(nn.Module):
    """Linear(dim -> feat_dim) then L2 normalisation (RD's Embed: x / ||x||, no epsilon)."""

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        x = self.linear(x.flatten(1))
        return x / x.pow(2).sum(1, keepdim=True).sqrt()


@register_method("crd")
class CRD(Method):
    paper = "Tian, Krishnan & Isola, Contrastive Representation Distillation, ICLR 2020"
    code = "HobbitLong/RepDistiller crd/"
    student_taps = ("embedding",)
    teacher_taps = ("embedding",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        labels = torch.as_tensor(pair.train_labels).long()
        self.n_data = n = len(labels)
        self.world = pair.world
        counts = torch.bincount(labels.cpu())
        if n == 0 or int((counts > 0).sum()) < 2:
            raise pair.incompatible(self.method_name, "CRD draws negatives from other classes; the training set has fewer than 2 classes")
        self.nce_k = min(int(cfg.get("nce_k", 16384)), n)
        self.nce_t = float(cfg.get("nce_t", 0.07))
        self.momentum = float(cfg.get("nce_m", 0.5))
        feat_dim = int(cfg.get("feat_dim", 128))
        self.embed_s = Embed(flat_dim(pair.student_shapes["embedding"]), feat_dim)
        self.embed_t = Embed(flat_dim(pair.teacher_shapes["embedding"]), feat_dim)
        self.sampler = ContrastSampler(labels, self.nce_k, str(cfg.get("mode", "exact")))
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("bank_s", torch.rand(n, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("bank_t", torch.rand(n, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0))  # [Z student-anchored, Z teacher-anchored]; <0 = unset

    def crd_loss(self, f_s: torch.Tensor, f_t: torch.Tensor, idx: torch.Tensor, contrast_idx=None) -> torch.Tensor:
        idx = idx.to(self.bank_s.device).long()
        e_s, e_t = self.embed_s(f_s), self.embed_t(f_t.detach())
        if contrast_idx is None:
            contrast_idx = self.sampler(idx)
        out_s = contrast_scores(self.bank_t, e_s, contrast_idx, self.nce_t)  # student-anchored
        out_t = contrast_scores(self.bank_s, e_t, contrast_idx, self.nce_t)  # teacher-anchored
        with torch.no_grad():  # fix Z once per direction, without a host sync
            first = torch.stack([out_s.mean(), out_t.mean()]) * self.n_data
            if self.world.distributed:  # the mean over every rank's first batch: one Z on every rank
                first = all_sum_tensor(first, self.world) / self.world.size
            self.z.copy_(torch.where(self.z < 0, first, self.z))
        z = self.z.detach()
        loss = nce_loss(out_s / z[0], self.n_data) + nce_loss(out_t / z[1], self.n_data)
        if self.world.distributed:  # every rank updates its banks with the whole global batch: banks stay equal
            idx = all_gather_cat(idx, self.world)
            e_s, e_t = all_gather_cat(e_s.detach(), self.world), all_gather_cat(e_t.detach(), self.world)
        momentum_update(self.bank_s, idx, e_s, self.momentum)
        momentum_update(self.bank_t, idx, e_t, self.momentum)
        return loss

    def terms(self, batch, student, teacher):
        return {"crd": self.crd_loss(student["embedding"], teacher["embedding"], batch.indices)}
