"""Zhang, Xiang, Hospedales & Lu, CVPR 2018, "Deep Mutual Learning" (DML).

No pre-trained teacher: a cohort of K networks trains together from scratch, each learning from the labels and
from the other members' posteriors. In kdbench the recorded (evaluated, checkpointed as `student`) network is
member 1; the other members ("peers") are submodules of this Method, built from `method.peers` with
create_model(name, num_classes, input_shape, **kwargs). They are trainable, so they join the main optimizer
(same optimizer, LR schedule and weight decay as the student) and the run checkpoint, and count as extra params.

Losses, all with T = 1 (the paper's softmax, no temperature) and KL averaged over the batch ("batchmean"):
  ce          CE(z_1, y)                                  the student's hard-label loss
  mimic       1/(K-1) * sum_{l != 1} KL(p_l || p_1)        paper Eq. 11 for member 1; the p_l are detached
  peer_ce     sum_{k >= 2} CE(z_k, y)
  peer_mimic  sum_{k >= 2} 1/(K-1) * sum_{l != k} KL(p_l || p_k)   (each member's own Eq. 11, others detached)
With `mimic: ensemble` every member instead mimics the mean of the other members' posteriors,
KL(mean_{l != k} p_l || p_k) (the paper's "DML_e" variant, Eq. 12). For a cohort of two the two variants agree:
mimic = KL(p_peer || p_student), peer_mimic = KL(p_student || p_peer).

Because the members' parameters are disjoint and every target posterior is detached, the gradient of
(ce + mimic + peer_ce + peer_mimic) w.r.t. member k is exactly the gradient of member k's own loss
L_k = CE_k + mimic_k, so one backward pass updates the whole cohort. Difference from the paper: Algorithm 1
updates the members one after another within an iteration (member 2's target uses member 1's already-updated
prediction, which needs a fresh forward per member); kdbench runs one forward of every member on the same
batch and updates all members simultaneously from those predictions (as most re-implementations do).
The peers see exactly the student's inputs (the same augmented batch), in the same train/eval mode.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError
from kdbench.models import create_model

MIMIC_MODES = ("pairwise", "ensemble")


def _kl(target_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) averaged over the batch; target_probs are probabilities (no grad expected)."""
    return F.kl_div(F.log_softmax(logits, dim=1), target_probs, reduction="batchmean")


def mimicry_loss(logits: torch.Tensor, others: Sequence[torch.Tensor], mode: str = "pairwise") -> torch.Tensor:
    """Member k's mimicry term: others = the other members' logits (detached here).

    pairwise: mean_l KL(p_l || p_k) (paper Eq. 11); ensemble: KL(mean_l p_l || p_k) (paper Eq. 12).
    """
    if mode not in MIMIC_MODES:
        raise KDBenchError(f"dml: method.mimic must be one of {list(MIMIC_MODES)}, got '{mode}'")
    if not others:
        raise KDBenchError("dml needs at least one peer (method.peers is empty)")
    probs = [F.softmax(o.detach().float(), dim=1) for o in others]
    logits = logits.float()
    if mode == "ensemble":
        return _kl(torch.stack(probs).mean(0), logits)
    return sum(_kl(p, logits) for p in probs) / len(probs)


def dml_loss(student_logits: torch.Tensor, peer_logits: Sequence[torch.Tensor], targets: torch.Tensor,
             mode: str = "pairwise") -> dict[str, torch.Tensor]:
    """The four DML terms (unweighted) for a cohort [student, *peers]; see the module docstring."""
    members = [student_logits, *peer_logits]
    mimics = [mimicry_loss(z, [o for j, o in enumerate(members) if j != k], mode) for k, z in enumerate(members)]
    return {
        "ce": F.cross_entropy(student_logits, targets),
        "mimic": mimics[0],
        "peer_ce": sum(F.cross_entropy(z, targets) for z in peer_logits),
        "peer_mimic": sum(mimics[1:]),
    }


def _peer_spec(entry) -> tuple[str, dict]:
    """A peer entry is a model name or a model config mapping {name: ..., **kwargs} (e.g. ${student.model})."""
    if isinstance(entry, dict):
        kwargs = dict(entry)
        if "name" not in kwargs:
            raise KDBenchError(f"dml: a method.peers entry given as a mapping needs a 'name' key, got {kwargs}")
        return str(kwargs.pop("name")), kwargs
    if isinstance(entry, str):
        return entry, {}
    raise KDBenchError(f"dml: method.peers entries must be model names or model configs, got {entry!r}")


@register_method("dml")
class DML(Method):
    paper = "Zhang, Xiang, Hospedales & Lu, Deep Mutual Learning, CVPR 2018"
    code = "YingZhangDUT/Deep-Mutual-Learning"
    needs_teacher = False

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.mimic_mode = str(cfg.get("mimic", "pairwise"))
        if self.mimic_mode not in MIMIC_MODES:
            raise KDBenchError(f"dml: method.mimic must be one of {list(MIMIC_MODES)}, got '{self.mimic_mode}'")
        peers = cfg.get("peers")
        if peers is None or isinstance(peers, (str, dict)):
            peers = [peers] if peers is not None else []
        if not peers:
            raise KDBenchError("dml needs at least one peer: set method.peers, e.g. method.peers=[resnet8x4]")
        if not pair.input_shape:
            raise KDBenchError("dml builds its peers from PairInfo.input_shape, which is empty")
        self.peer_names = []
        built = []
        for entry in peers:
            name, kwargs = _peer_spec(entry)
            built.append(create_model(name, num_classes=pair.num_classes, input_shape=pair.input_shape, **kwargs))
            self.peer_names.append(name)
        self.peers = nn.ModuleList(built)

    def terms(self, batch, student, teacher):
        peer_logits = [peer(batch.inputs) for peer in self.peers]
        terms = dml_loss(student["logits"], peer_logits, batch.targets, self.mimic_mode)
        del terms["ce"]  # the base class's term
        return terms
