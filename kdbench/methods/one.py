"""Lan, Zhu & Gong, NeurIPS 2018, "Knowledge Distillation by On-the-Fly Native Ensemble" (ONE); reference code
Lan1991Xu/ONE_NeurIPS2018 (cifar_one.py, models/cifar/resnet.py ONE_ResNet, loss/kl_loss.py, utils/ramps.py).

No pre-trained teacher. The student becomes a multi-branch network: its layers up to the last stage are shared, and
m - 1 extra branches (m = `branches`, 3 in the code: layer3_1..3 with classifiers 3_1..3), each a fresh copy of the
student's last stage + classifier, read the same shared map x (the tap before the last stage: stage2 of a CIFAR ResNet
or WRN, stage3 of a VGG/ResNet18). Branch 1 is the student's own last stage, so the recorded (and checkpointed)
student is the paper's "ONE" target network with the auxiliary branches removed; the extra branches and the gate are
modules of this Method (trained, checkpointed, counted as extra parameters).

Gate (ONE_ResNet.forward): g = softmax(ReLU(BN1d(W_g pool(x) + b_g))), one weight per branch and sample, pool = the
global average pool of x (the code's AvgPool2d(16) on the 16x16 map). The ensemble teacher is z_e = sum_i g_i z_i
(logits). With p^T = softmax(z / T), T = 3 (kl_loss.py), q_e = softmax(z_e / T) + 1e-7 detached (not renormalised):
  ce           CE(z_1, y)                                   (the base class's term: the student's branch)
  branch_ce    sum_{i >= 2} CE(z_i, y)
  ensemble_ce  CE(z_e, y)                                    (trains the gate and, through z_e, every branch)
  kl           T^2 * mean_b sum_c q_e (log q_e - log p_1^T)  (the student's branch learning from the ensemble)
  branch_kl    sum_{i >= 2} of the same for branch i
total = ce + branch_ce + ensemble_ce + w(e) * (kl + branch_kl), all weights 1 as in cifar_one.py. w(e) is the
code's sigmoid ramp-up exp(-5 (1 - min(e, R)/R)^2) over R = 80 epochs (scripts/ONE_ResNet*.sh --consistency_rampup
80; e = the 0-indexed epoch, kdbench epoch - 1), applied to the KL terms only. The paper's loss has no ramp-up (the
README offers it as a tip for stable training): `rampup_epochs: 0` gives that variant.

Evaluation: the run is branch 1 (the student alone); extra heads `branch2` .. `branch<m>` and `ensemble` (the gated
z_e, the paper's ONE-E) get records of their own. Differences kept from the code: eps 1e-7 on the target; the gate's
BN is in train mode during training. Not reproduced: the code's ResNet-110 is the bearpaw Bottleneck network (depth
>= 44 -> Bottleneck), kdbench's resnet110 is the RepDistiller BasicBlock one.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError
from kdbench.methods.branches import SOFT_TARGET_EPS, make_tails, require_split, sigmoid_rampup, soft_target_kl
from kdbench.models import count_parameters

KL_TERMS = ("kl", "branch_kl")


def gate_weights(x: torch.Tensor, linear: nn.Linear, bn: nn.BatchNorm1d) -> torch.Tensor:
    """ONE's gate: softmax over branches of ReLU(BN(W pool(x) + b)), pool = global average over H, W -> (B, m)."""
    return F.softmax(F.relu(bn(linear(x.mean((2, 3))))), dim=1)


def gated_ensemble(branch_logits: Sequence[torch.Tensor], gate: torch.Tensor) -> torch.Tensor:
    """z_e = sum_i gate[:, i] * z_i (the gate is not detached: CE(z_e) trains it)."""
    return sum(gate[:, i:i + 1] * z for i, z in enumerate(branch_logits))


def one_loss(branch_logits: Sequence[torch.Tensor], gate: torch.Tensor, targets: torch.Tensor,
             temperature: float = 3.0, eps: float = SOFT_TARGET_EPS) -> dict[str, torch.Tensor]:
    """ONE's unweighted terms (ONE_NeurIPS2018 cifar_one.py train(), loss/kl_loss.py) for branches [z_1 (the
    student), z_2, ..., z_m] and gate weights g (B, m), with z_e = sum_i g_i z_i and KL_T(a -> b) = soft_target_kl:
      ce = CE(z_1, y), branch_ce = sum_{i>=2} CE(z_i, y), ensemble_ce = CE(z_e, y),
      kl = KL_T(z_e -> z_1), branch_kl = sum_{i>=2} KL_T(z_e -> z_i)   (z_e detached in the KLs, T = 3, eps 1e-7)."""
    if len(branch_logits) != gate.shape[1] or len(branch_logits) < 2:
        raise KDBenchError(f"one: {len(branch_logits)} branches but a gate over {gate.shape[1]} (need >= 2 of each)")
    z_e = gated_ensemble(branch_logits, gate)
    kls = [soft_target_kl(z, z_e, temperature, eps) for z in branch_logits]
    return {
        "ce": F.cross_entropy(branch_logits[0], targets),
        "branch_ce": sum(F.cross_entropy(z, targets) for z in branch_logits[1:]),
        "ensemble_ce": F.cross_entropy(z_e, targets),
        "kl": kls[0],
        "branch_kl": sum(kls[1:]),
    }


@register_method("one")
class ONE(Method):
    paper = "Lan, Zhu & Gong, Knowledge Distillation by On-the-Fly Native Ensemble, NeurIPS 2018"
    code = "Lan1991Xu/ONE_NeurIPS2018"
    needs_teacher = False

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.num_branches = int(cfg.get("branches", 3))
        if self.num_branches < 2:
            raise KDBenchError(f"one: method.branches counts the student's own branch and must be >= 2, "
                               f"got {self.num_branches}")
        self.temperature = float(cfg.get("temperature", 3.0))
        self.rampup_epochs = float(cfg.get("rampup_epochs", 80))
        self.eps = float(cfg.get("eps", SOFT_TARGET_EPS))
        _, self.branch_tap, _ = require_split(pair, self.method_name)
        self.student_taps = (self.branch_tap, "logits")
        self.tails = nn.ModuleList(make_tails(cfg.get("branch_model"), self.num_branches - 1, pair, self.method_name))
        channels = pair.student_shapes[self.branch_tap][0]
        self.gate_fc = nn.Linear(channels, self.num_branches)
        self.gate_bn = nn.BatchNorm1d(self.num_branches)

    # -- the branches

    def branch_logits(self, student: dict) -> list[torch.Tensor]:
        x = student[self.branch_tap]
        return [student["logits"], *(tail(x)[2] for tail in self.tails)]

    def gate(self, student: dict) -> torch.Tensor:
        return gate_weights(student[self.branch_tap], self.gate_fc, self.gate_bn)

    def terms(self, batch, student, teacher):
        terms = one_loss(self.branch_logits(student), self.gate(student), batch.targets, self.temperature, self.eps)
        del terms["ce"]  # the base class's term
        return terms

    def term_weights(self, epoch: int) -> dict[str, float]:
        ramp = sigmoid_rampup(epoch - 1, self.rampup_epochs)
        return {k: w * ramp if k in KL_TERMS else w for k, w in self.weights.items()}

    # -- evaluation and record

    def extra_heads(self):
        def branch(i):
            return lambda student, x: self.tails[i](student.forward_taps(x, (self.branch_tap,))[self.branch_tap])[2]

        def ensemble(student, x):
            out = student.forward_taps(x, self.student_taps)
            return gated_ensemble(self.branch_logits(out), self.gate(out))

        heads = {f"branch{i + 2}": branch(i) for i in range(len(self.tails))}
        heads["ensemble"] = ensemble
        return heads

    def record_fields(self) -> dict:
        return {"evaluated_head": "student (branch 1: the shared layers + the student's own last stage)",
                "online": {"branches": self.num_branches, "shared_up_to": self.branch_tap,
                           "extra_params": {**{f"branch{i + 2}": count_parameters(t) for i, t in enumerate(self.tails)},
                                            "gate": count_parameters(self.gate_fc) + count_parameters(self.gate_bn)}}}
