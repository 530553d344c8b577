"""Minami, Hirakawa, Yamashita & Fujiyoshi, ACCV 2020, "Knowledge Transfer Graph for Deep Collaborative Learning"
(KTG); reference code somaminami/DCL (train.py, lib/loss_func.py, lib/trainer.py).

No pre-trained teacher. A graph of networks trained together: nodes are models, node 0 is the run's student (the
recorded network) and `nodes` lists nodes 1, 2, ...; every edge is one loss term of its target node:
  {target: t, source: t, loss: ce, gate: g}   a self-loop: node t's cross entropy on the labels
                                              (IndependentLoss; the term of node 0 is the base class's `ce`, of node
                                              t > 0 `ce_<t>`)
  {target: t, source: s, loss: kl, gate: g}   node t learns from node s's (detached) posterior: term `kl_<t>_from_<s>`
                                              = T^2 * gate-reduced over the batch of sum_c q_c log(q_c / (p_c + 1e-10)
                                              + 1e-10), q = softmax(z_s / T), p = softmax(z_t / T), T = 1 (KLLoss)
Gates (lib/loss_func.py), which decide how much of an edge's per-sample loss passes:
  through   the batch mean
  correct   the batch mean of the loss masked to the samples the source classifies correctly (CorrectGate; for a ce
            self-loop the source is the one-hot label, so nothing is masked)
  linear    the batch mean times a weight that grows linearly over training (LinearGate: iteration / total
            iterations); kdbench ramps it per epoch in term_weights, (epoch - 1/2) / epochs, the epoch's mean of the
            code's per-iteration ramp
  cutoff    no loss: the edge has no term (leave it out, or give it gate cutoff)
The terms are summed with the weights of method.weights (the code's loss_weight 1 each); since every source is
detached, each node's parameters get exactly the gradient of that node's own loss, which is how the code's
per-node optimizers (identical settings) update them.

The paper searches the graph (gates per edge, models per node) with Optuna over 1,500 trials per setting; kdbench runs
a given graph. The shipped default is the code's search template with every edge present and gate `through` (3
ResNet-style nodes, = deep mutual learning with T = 1). Not supported: the code's pre-trained frozen nodes (a node all
of whose inputs are cut off is loaded from a checkpoint there) and its "Ensemble" node. Evaluation: the run is node 0;
heads node1, node2, ... get records of their own.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError
from kdbench.methods.branches import build_model
from kdbench.models import count_parameters

GATES = ("through", "correct", "linear", "cutoff")
LOSSES = ("ce", "kl")
KL_EPS = 1e-10  # lib/loss_func.py KLLoss.kl_divergence: log(t / (s + 1e-10) + 1e-10)


def edge_term(target: int, source: int) -> str:
    """The term name of an edge: `ce` / `ce_<t>` for a self-loop, `kl_<t>_from_<s>` otherwise."""
    if target == source:
        return "ce" if target == 0 else f"ce_{target}"
    return f"kl_{target}_from_{source}"


def gate_reduce(per_sample: torch.Tensor, gate: str, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """An edge's per-sample loss reduced as its gate does (the linear gate's weight is applied in term_weights)."""
    if gate in ("through", "linear"):
        return per_sample.mean()
    if gate == "correct":
        return (per_sample * mask.to(per_sample.dtype)).mean()
    raise KDBenchError(f"ktg: gate '{gate}' has no loss (cutoff edges have no term)")


def ktg_kl(target_logits: torch.Tensor, source_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per sample: sum_c q_c log(q_c / (p_c + 1e-10) + 1e-10), q = softmax(source / T) detached,
    p = softmax(target / T) (DCL lib/loss_func.py KLLoss.kl_divergence)."""
    p = F.softmax(target_logits.float() / temperature, dim=1)
    q = F.softmax(source_logits.detach().float() / temperature, dim=1)
    return (q * torch.log(q / (p + KL_EPS) + KL_EPS)).sum(1)


def ktg_edge_loss(loss: str, gate: str, target_logits: torch.Tensor, source_logits: Optional[torch.Tensor],
                  labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """One edge's unweighted loss (DCL lib/loss_func.py IndependentLoss / KLLoss with their gates):
      ce:  gate-reduce_b CE(z_target[b], y[b])
      kl:  T^2 * gate-reduce_b sum_c q_bc log(q_bc / (p_bc + 1e-10) + 1e-10),
           q = softmax(z_source / T) (detached), p = softmax(z_target / T)
    gate-reduce: the batch mean (through, linear), or the batch mean of the loss times [argmax z_source = y]
    (correct; for ce the source is the one-hot label, so no sample is masked)."""
    if loss == "ce":
        return gate_reduce(F.cross_entropy(target_logits, labels, reduction="none"), gate,
                           torch.ones_like(labels, dtype=torch.bool))
    if loss == "kl":
        correct = source_logits.detach().argmax(1) == labels
        return gate_reduce(ktg_kl(target_logits, source_logits, temperature), gate, correct) * temperature ** 2
    raise KDBenchError(f"ktg: edge loss must be one of {list(LOSSES)}, got '{loss}'")


def parse_edges(edges, num_nodes: int) -> list[dict]:
    """Checked edges (target, source, loss, gate), cutoff edges dropped; a self-loop is a ce edge, any other a kl
    edge."""
    parsed, seen = [], set()
    for edge in edges or []:
        if not isinstance(edge, dict) or not {"target", "source"} <= set(edge):
            raise KDBenchError(f"ktg: an edge is a mapping with target, source, loss and gate; got {edge!r}")
        t, s = int(edge["target"]), int(edge["source"])
        loss = str(edge.get("loss", "ce" if t == s else "kl"))
        gate = str(edge.get("gate", "through"))
        if not (0 <= t < num_nodes and 0 <= s < num_nodes):
            raise KDBenchError(f"ktg: edge {t} <- {s} names a node outside 0..{num_nodes - 1}")
        if gate not in GATES:
            raise KDBenchError(f"ktg: edge {t} <- {s}: gate must be one of {list(GATES)}, got '{gate}'")
        if loss not in LOSSES or (loss == "ce") != (t == s):
            raise KDBenchError(f"ktg: edge {t} <- {s}: a self-loop is a ce edge and any other a kl edge, got '{loss}'")
        if (t, s) in seen:
            raise KDBenchError(f"ktg: edge {t} <- {s} is listed twice")
        seen.add((t, s))
        if gate != "cutoff":
            parsed.append({"target": t, "source": s, "loss": loss, "gate": gate, "term": edge_term(t, s)})
    untrained = sorted(set(range(num_nodes)) - {e["target"] for e in parsed})
    if untrained:
        raise KDBenchError(f"ktg: node(s) {untrained} have no incoming edge, so nothing would train them (the code's "
                           f"pre-trained frozen nodes are not supported)")
    return parsed


@register_method("ktg")
class KTG(Method):
    paper = "Minami et al., Knowledge Transfer Graph for Deep Collaborative Learning, ACCV 2020"
    code = "somaminami/DCL"
    needs_teacher = False

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        entries = cfg.get("nodes") or []
        if isinstance(entries, (str, dict)):
            entries = [entries]
        built = [build_model(entry, pair, self.method_name) for entry in entries]
        self.node_names = [pair.student_name, *(name for name, _ in built)]
        self.nodes = nn.ModuleList(model for _, model in built)
        self.temperature = float(cfg.get("temperature", 1.0))
        self.edges = parse_edges(cfg.get("edges"), len(self.node_names))
        self.epochs = int(pair.epochs)

    def node_logits(self, inputs: torch.Tensor, student: dict) -> list[torch.Tensor]:
        return [student["logits"], *(node(inputs) for node in self.nodes)]

    def terms(self, batch, student, teacher):
        logits = self.node_logits(batch.inputs, student)
        out = {}
        for e in self.edges:
            source = logits[e["source"]] if e["loss"] == "kl" else None
            out[e["term"]] = ktg_edge_loss(e["loss"], e["gate"], logits[e["target"]], source, batch.targets,
                                           self.temperature)
        return out

    def all_terms(self, batch, student, teacher):
        return self.terms(batch, student, teacher)  # node 0's ce is its self-loop edge (if the graph has one)

    def term_weights(self, epoch: int) -> dict[str, float]:
        ramps = {e["term"]: linear_gate(epoch, self.epochs) for e in self.edges if e["gate"] == "linear"}
        return {k: w * ramps.get(k, 1.0) for k, w in self.weights.items()}

    def extra_heads(self):
        return {f"node{i + 1}": (lambda student, x, node=node: node(x)) for i, node in enumerate(self.nodes)}

    def record_fields(self) -> dict:
        return {"evaluated_head": "student (node 0)",
                "online": {"nodes": self.node_names,
                           "edges": [{k: e[k] for k in ("target", "source", "loss", "gate")} for e in self.edges],
                           "extra_params": {f"node{i + 1}": count_parameters(n) for i, n in enumerate(self.nodes)}}}


def linear_gate(epoch: int, epochs: int) -> float:
    """The linear gate's weight in 1-indexed `epoch` of `epochs`: (epoch - 1/2) / epochs, the mean over the epoch of
    the code's per-iteration ramp iteration / total iterations."""
    return (float(epoch) - 0.5) / float(max(epochs, 1))
