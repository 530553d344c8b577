"""Kim, Hyun, Chung & Kwak, ICPR 2020 (arXiv 1904.09058), "Feature Fusion for Online Mutual Knowledge Distillation"
(FFL); reference code Jangho-Kim/FFL-pytorch (train_FFL.py, our_network.py FFL_ResNet and Fusion_module, utils.py).

No pre-trained teacher. Two sub-networks train together with a fusion module that classifies from both of their
last-stage feature maps. The student is sub-network 1 (the paper's FFL-S row when recorded alone).
`share: branch` (the code's FFL_ResNet, which reproduces the paper's Table 1): the sub-networks share the student's
layers up to the last stage and sub-network 2 is a fresh copy of that last stage + classifier; `share: none`:
sub-network 2 is a whole network of `peer_model` (another architecture too, as the paper's heterogeneous pairs),
whose last-stage map must have the student's spatial size.

Fusion module (Fusion_module): concat(f_1, f_2) (C = C_1 + C_2 channels) -> depthwise 3x3 conv (groups C, no bias)
-> BN -> ReLU -> 1x1 conv C -> C_out (no bias; C_out = the student's last-stage width, the code's `channel`) -> BN ->
ReLU -> global average pool -> Linear(C_out, classes) = z_f. Conv init N(0, sqrt(2 / (k^2 C_out))), BN 1/0.
With T = 3 and q = softmax(target / T) + 1e-7 of a detached target (utils.KLLoss, `.data`):
  ce        CE(z_1, y)                      (the base class's term)
  sub_ce    CE(z_2, y)
  fused_ce  CE(z_f, y)
  kl        T^2 KL(z_f -> z_1)              (the student learns from the fused classifier)
  sub_kl    T^2 KL(z_f -> z_2)
  fused_kl  T^2 KL((z_1 + z_2) / 2 -> z_f)  (the fused classifier learns from the sub-networks' mean logit)
total = ce + sub_ce + fused_ce + w(e) * (kl + sub_kl + fused_kl), all weights 1 (train_FFL.py), w = the sigmoid
ramp-up over --consistency_rampup 80 epochs (e = the 0-indexed epoch = kdbench epoch - 1).

The code trains the fusion module with its own SGD optimizer, weight decay 1e-5 against the networks' 1e-4 (same lr,
momentum, Nesterov and schedule). kdbench has one optimizer per run, so the fusion module passes its parameters
through branches.DecayAdjust with delta = fusion_weight_decay - run_weight_decay: its step sees grad + 1e-5 * w
exactly. Evaluation: the run is sub-network 1; heads `sub2` and `fused` (the paper's FFL row) get records of their own.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError
from kdbench.methods.branches import (SOFT_TARGET_EPS, build_model, decay_adjusted, make_tails, require_split,
                                      sigmoid_rampup, soft_target_kl)
from kdbench.models import count_parameters, probe_taps

KL_TERMS = ("kl", "sub_kl", "fused_kl")
SHARE_MODES = ("branch", "none")


class FusionModule(nn.Module):
    """FFL's fusion classifier over the concatenated last-stage maps (see the module docstring). `decay_delta` offsets
    its parameters' gradients by delta * w (DecayAdjust), for a weight decay of its own."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_classes: int, decay_delta: float = 0.0):
        super().__init__()
        c = int(sum(in_channels))
        self.dwconv = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.pwconv = nn.Conv2d(c, out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.fc = nn.Linear(out_channels, num_classes)
        self.decay_delta = float(decay_delta)
        for m in (self.dwconv, self.pwconv):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))

    def _bn(self, x, bn: nn.BatchNorm2d, w):
        momentum = bn.momentum if bn.momentum is not None else 0.0
        if self.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        train = self.training or not bn.track_running_stats
        return F.batch_norm(x, bn.running_mean, bn.running_var, w(bn.weight), w(bn.bias), train, momentum, bn.eps)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        def w(p):
            return decay_adjusted(p, self.decay_delta)

        x = torch.cat(list(maps), dim=1)
        x = F.conv2d(x, w(self.dwconv.weight), None, 1, 1, 1, self.dwconv.groups)
        x = F.relu(self._bn(x, self.bn1, w))
        x = F.relu(self._bn(F.conv2d(x, w(self.pwconv.weight)), self.bn2, w))
        return F.linear(x.mean((2, 3)), w(self.fc.weight), w(self.fc.bias))


def ffl_loss(sub_logits: Sequence[torch.Tensor], fused_logits: torch.Tensor, targets: torch.Tensor,
             temperature: float = 3.0, eps: float = SOFT_TARGET_EPS) -> dict[str, torch.Tensor]:
    """FFL's unweighted terms (FFL-pytorch train_FFL.py train(), utils.KLLoss) for sub-networks [z_1 (the student),
    z_2] and the fused logits z_f, with KL_T(a -> b) = soft_target_kl (target detached, T = 3, eps 1e-7):
      ce = CE(z_1, y), sub_ce = CE(z_2, y), fused_ce = CE(z_f, y),
      kl = KL_T(z_f -> z_1), sub_kl = KL_T(z_f -> z_2), fused_kl = KL_T((z_1 + z_2) / 2 -> z_f)."""
    if len(sub_logits) != 2:
        raise KDBenchError(f"ffl: two sub-networks expected, got {len(sub_logits)}")
    z1, z2 = sub_logits
    return {
        "ce": F.cross_entropy(z1, targets),
        "sub_ce": F.cross_entropy(z2, targets),
        "fused_ce": F.cross_entropy(fused_logits, targets),
        "kl": soft_target_kl(z1, fused_logits, temperature, eps),
        "sub_kl": soft_target_kl(z2, fused_logits, temperature, eps),
        "fused_kl": soft_target_kl(fused_logits, (z1 + z2) / 2, temperature, eps),
    }


@register_method("ffl")
class FFL(Method):
    paper = "Kim et al., Feature Fusion for Online Mutual Knowledge Distillation, ICPR 2020"
    code = "Jangho-Kim/FFL-pytorch"
    needs_teacher = False

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.share = str(cfg.get("share", "branch"))
        if self.share not in SHARE_MODES:
            raise KDBenchError(f"ffl: method.share must be one of {list(SHARE_MODES)}, got '{self.share}'")
        self.temperature = float(cfg.get("temperature", 3.0))
        self.eps = float(cfg.get("eps", SOFT_TARGET_EPS))
        self.rampup_epochs = float(cfg.get("rampup_epochs", 80))
        entry = cfg.get("peer_model")
        if self.share == "branch":
            _, self.branch_tap, self.last_tap = require_split(pair, self.method_name)
            self.student_taps = (self.branch_tap, self.last_tap, "logits")
            (self.sub2,) = make_tails(entry, 1, pair, self.method_name)
            peer_map = pair.student_shapes[self.last_tap]
        else:
            if not pair.student.stage_names:
                raise pair.incompatible(self.method_name, "the fusion module needs the student's last-stage map, and "
                                                          "it has no stage taps")
            self.branch_tap, self.last_tap = None, pair.student.stage_names[-1]
            self.student_taps = (self.last_tap, "logits")
            name, self.sub2 = build_model(entry, pair, self.method_name)
            if not self.sub2.stage_names:
                raise pair.incompatible(self.method_name, f"its second network {name} has no stage taps to fuse")
            self.peer_tap = self.sub2.stage_names[-1]
            peer_map = probe_taps(self.sub2, pair.input_shape, (self.peer_tap,))[self.peer_tap]
        own_map = pair.student_shapes[self.last_tap]
        if len(own_map) != 3 or len(peer_map) != 3 or tuple(own_map[1:]) != tuple(peer_map[1:]):
            raise pair.incompatible(self.method_name, f"the fusion module concatenates the two last-stage maps, of "
                                                      f"shapes {tuple(own_map)} and {tuple(peer_map)}: they need the "
                                                      f"same H x W")
        out = cfg.get("fusion_channels")
        out = int(own_map[0]) if out is None else int(out)
        self.fusion_weight_decay = _optional_float(cfg.get("fusion_weight_decay"))
        self.run_weight_decay = _optional_float(cfg.get("run_weight_decay"))
        delta = 0.0
        if self.fusion_weight_decay is not None:
            if self.run_weight_decay is None:
                raise KDBenchError("ffl: method.fusion_weight_decay needs method.run_weight_decay (the run's "
                                   "optim.weight_decay, ${optim.weight_decay} in the YAML)")
            delta = self.fusion_weight_decay - self.run_weight_decay
        self.fusion = FusionModule((own_map[0], peer_map[0]), out, pair.num_classes, delta)

    # -- the networks

    def sub2_out(self, inputs: torch.Tensor, student: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(last-stage map, logits) of sub-network 2."""
        if self.share == "branch":
            feature, _, logits = self.sub2(student[self.branch_tap])
            return feature, logits
        out = self.sub2.forward_taps(inputs, (self.peer_tap,))
        return out[self.peer_tap], out["logits"]

    def terms(self, batch, student, teacher):
        f2, z2 = self.sub2_out(batch.inputs, student)
        fused = self.fusion([student[self.last_tap], f2])
        terms = ffl_loss([student["logits"], z2], fused, batch.targets, self.temperature, self.eps)
        del terms["ce"]  # the base class's term
        return terms

    def term_weights(self, epoch: int) -> dict[str, float]:
        ramp = sigmoid_rampup(epoch - 1, self.rampup_epochs)
        return {k: w * ramp if k in KL_TERMS else w for k, w in self.weights.items()}

    # -- evaluation and record

    def extra_heads(self):
        def sub2(student, x):
            out = student.forward_taps(x, (self.branch_tap,)) if self.share == "branch" else {}
            return self.sub2_out(x, out)[1]

        def fused(student, x):
            out = student.forward_taps(x, self.student_taps)
            return self.fusion([out[self.last_tap], self.sub2_out(x, out)[0]])

        return {"sub2": sub2, "fused": fused}

    def record_fields(self) -> dict:
        return {"evaluated_head": "student (sub-network 1)",
                "online": {"share": self.share, "shared_up_to": self.branch_tap, "fused_taps": self.last_tap,
                           "fusion_weight_decay": self.fusion_weight_decay,
                           "extra_params": {"sub2": count_parameters(self.sub2),
                                            "fusion": count_parameters(self.fusion)}}}


def _optional_float(value) -> Optional[float]:
    return None if value is None else float(value)
