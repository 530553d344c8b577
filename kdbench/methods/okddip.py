"""Chen, Mei, Wang, Feng & Chen, AAAI 2020, "Online Knowledge Distillation with Diverse Peers" (OKDDip); reference
code DefangChen/OKDDip (train_GL.py, models/model_cifar/resnet_GL.py ResNet, MultiNet.py StuNet, utils.py KL_Loss).

No pre-trained teacher. m auxiliary peers (`peers`: 3 = the code's --num_branches 4 minus the leader) and one group
leader train together; the leader is the network kept for inference, so kdbench's recorded student is the leader.
`share: branch` (train_GL.py's default model, resnet_GL.ResNet): peers and leader share the student's layers up to its
last stage and each peer is a fresh copy of that last stage + classifier (modules of this Method); `share: none`
(--MulStu, MultiNet.StuNet: "network-based"): every peer is a whole network of `peer_model`.

First level (peers). With h_i the pooled last-stage features of peer i, q_i = W_q h_i and k_i = W_k h_i
(Linear(C -> C // factor, no bias), factor 8, shared by all peers), the aggregation weights are
a_ij = softmax_j(q_i . k_j) over all peers j (peer i included, as in the code), and peer i's target logits are
t_i = sum_j a_ij z_j. Second level (leader): the target is the peers' mean logit z_bar = mean_i z_i.
With p^T = softmax(z / T), T = 3, and q = softmax(target / T) + 1e-7 (utils.KL_Loss):
  ce          CE(z_leader, y)                                       (the base class's term)
  peer_ce     sum_i CE(z_i, y)
  peer_kl     sum_i T^2 * mean_b sum_c q(t_i) (log q(t_i) - log p_i^T)
  leader_kl   T^2 * mean_b sum_c q(z_bar) (log q(z_bar) - log p_leader^T)
total = ce + peer_ce + w(e) * alpha * (peer_kl + leader_kl), alpha = 1 (weights peer_kl, leader_kl), w = the code's
sigmoid ramp-up over --length 80 epochs from epoch 0 (--start_consistency 0), e = kdbench epoch - 1.

Gradient through the targets: utils.KL_Loss does not detach its target, so in the code the peer KL also trains the
other peers and W_q / W_k (which get no gradient otherwise), and the leader KL also trains the peers
(`detach_targets: false`, the default). `detach_targets: true` treats every target as a constant (then W_q / W_k never
learn). Evaluation: the run is the leader; heads peer1..peer<m> and `ensemble` (mean of the peers' logits, as the
code's test_accTop1) get records of their own.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError
from kdbench.methods.branches import (SOFT_TARGET_EPS, build_model, make_tails, require_split, sigmoid_rampup,
                                      soft_target_kl)
from kdbench.models import count_parameters

KL_TERMS = ("peer_kl", "leader_kl")
SHARE_MODES = ("branch", "none")


def peer_attention(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """a[b, i, j] = softmax_j(q[b, i] . k[b, j]) for queries / keys of shape (B, m, d) -> (B, m, m)."""
    return F.softmax(torch.bmm(queries, keys.transpose(1, 2)), dim=-1)


def peer_targets(peer_logits: Sequence[torch.Tensor], attention: torch.Tensor) -> list[torch.Tensor]:
    """t_i = sum_j a[:, i, j] z_j for every peer i."""
    stacked = torch.stack(list(peer_logits), dim=1)  # (B, m, C)
    return list(torch.bmm(attention, stacked).unbind(1))


def okddip_loss(peer_logits: Sequence[torch.Tensor], attention: torch.Tensor, leader_logits: torch.Tensor,
                targets: torch.Tensor, temperature: float = 3.0, eps: float = SOFT_TARGET_EPS,
                detach_targets: bool = False) -> dict[str, torch.Tensor]:
    """OKDDip's unweighted terms (OKDDip train_GL.py train(), utils.KL_Loss), attention a (B, m, m) with rows summing
    to 1, t_i = sum_j a_ij z_j, z_bar = mean_i z_i and KL_T(a -> b) = soft_target_kl:
      ce = CE(z_leader, y), peer_ce = sum_i CE(z_i, y), peer_kl = sum_i KL_T(t_i -> z_i),
      leader_kl = KL_T(z_bar -> z_leader)   (T = 3, eps 1e-7; targets detached only with detach_targets)."""
    if len(peer_logits) < 1 or attention.shape[1:] != (len(peer_logits), len(peer_logits)):
        raise KDBenchError(f"okddip: {len(peer_logits)} peers but attention of shape {tuple(attention.shape)}")
    detach = bool(detach_targets)
    targets_i = peer_targets(peer_logits, attention)
    z_bar = torch.stack(list(peer_logits)).mean(0)
    return {
        "ce": F.cross_entropy(leader_logits, targets),
        "peer_ce": sum(F.cross_entropy(z, targets) for z in peer_logits),
        "peer_kl": sum(soft_target_kl(z, t, temperature, eps, detach_target=detach)
                       for z, t in zip(peer_logits, targets_i)),
        "leader_kl": soft_target_kl(leader_logits, z_bar, temperature, eps, detach_target=detach),
    }


@register_method("okddip")
class OKDDip(Method):
    paper = "Chen et al., Online Knowledge Distillation with Diverse Peers, AAAI 2020"
    code = "DefangChen/OKDDip"
    needs_teacher = False

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.num_peers = int(cfg.get("peers", 3))
        if self.num_peers < 1:
            raise KDBenchError(f"okddip: method.peers (auxiliary peers beside the leader) must be >= 1, "
                               f"got {self.num_peers}")
        self.share = str(cfg.get("share", "branch"))
        if self.share not in SHARE_MODES:
            raise KDBenchError(f"okddip: method.share must be one of {list(SHARE_MODES)}, got '{self.share}'")
        self.temperature = float(cfg.get("temperature", 3.0))
        self.eps = float(cfg.get("eps", SOFT_TARGET_EPS))
        self.rampup_epochs = float(cfg.get("rampup_epochs", 80))
        self.detach_targets = bool(cfg.get("detach_targets", False))
        self.factor = int(cfg.get("factor", 8))
        entry = cfg.get("peer_model")
        if self.share == "branch":
            _, self.branch_tap, _ = require_split(pair, self.method_name)
            self.student_taps = (self.branch_tap, "logits")
            self.peer_nets = nn.ModuleList(make_tails(entry, self.num_peers, pair, self.method_name))
            dim = int(pair.student_shapes["embedding"][0])
        else:
            self.branch_tap = None
            built = [build_model(entry, pair, self.method_name) for _ in range(self.num_peers)]
            self.peer_nets = nn.ModuleList(model for _, model in built)
            dim = _embedding_dim(self.peer_nets[0], pair.input_shape)
        if dim // self.factor < 1:
            raise pair.incompatible(self.method_name, f"peer features of width {dim} leave no attention dimension at "
                                                      f"factor {self.factor}")
        self.query = nn.Linear(dim, dim // self.factor, bias=False)
        self.key = nn.Linear(dim, dim // self.factor, bias=False)

    # -- the peers

    def peers(self, inputs: torch.Tensor, student: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(pooled features, logits) of every peer."""
        if self.share == "branch":
            outs = [net(student[self.branch_tap]) for net in self.peer_nets]
            return [o[1] for o in outs], [o[2] for o in outs]
        outs = [net.forward_taps(inputs, ("embedding",)) for net in self.peer_nets]
        return [o["embedding"] for o in outs], [o["logits"] for o in outs]

    def attention(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        h = torch.stack(list(features), dim=1)  # (B, m, C)
        return peer_attention(self.query(h), self.key(h))

    def terms(self, batch, student, teacher):
        features, logits = self.peers(batch.inputs, student)
        terms = okddip_loss(logits, self.attention(features), student["logits"], batch.targets, self.temperature,
                            self.eps, self.detach_targets)
        del terms["ce"]  # the base class's term
        return terms

    def term_weights(self, epoch: int) -> dict[str, float]:
        ramp = sigmoid_rampup(epoch - 1, self.rampup_epochs)
        return {k: w * ramp if k in KL_TERMS else w for k, w in self.weights.items()}

    # -- evaluation and record

    def _peer_logits(self, student, x) -> list[torch.Tensor]:
        out = student.forward_taps(x, (self.branch_tap,)) if self.share == "branch" else {}
        return self.peers(x, out)[1]

    def extra_heads(self):
        def peer(i):
            if self.share == "branch":
                tap = self.branch_tap
                return lambda student, x: self.peer_nets[i](student.forward_taps(x, (tap,))[tap])[2]
            return lambda student, x: self.peer_nets[i](x)

        heads = {f"peer{i + 1}": peer(i) for i in range(self.num_peers)}
        heads["ensemble"] = lambda student, x: torch.stack(self._peer_logits(student, x)).mean(0)
        return heads

    def record_fields(self) -> dict:
        return {"evaluated_head": "student (the group leader)",
                "online": {"peers": self.num_peers, "share": self.share,
                           "shared_up_to": self.branch_tap,
                           "extra_params": {**{f"peer{i + 1}": count_parameters(n)
                                               for i, n in enumerate(self.peer_nets)},
                                            "attention": count_parameters(self.query) + count_parameters(self.key)}}}


def _embedding_dim(model, input_shape) -> int:
    was = model.training
    model.eval()
    with torch.no_grad():
        dim = model.forward_taps(torch.zeros(2, *input_shape), ("embedding",))["embedding"].shape[1]
    model.train(was)
    return int(dim)
