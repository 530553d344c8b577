"""ktg (Knowledge Transfer Graph, Minami et al. ACCV 2020): nodes trained together, one loss term per edge with a gate;
the edge losses and gates against NumPy, the graph's validation, the wiring (each node trained by its own edges), the
extra networks and one-epoch jobs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.distill import create_method, method_class
from kdbench.errors import KDBenchError
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair
from tests.helpers import close, method_options, np_ce, np_softmax, rand64
from tests.methods.online_helpers import SMALL_SYNTHETIC, assert_online_job

TERMS = {"ce", "kl_0_from_1", "kl_0_from_2", "ce_1", "kl_1_from_0", "kl_1_from_2", "ce_2", "kl_2_from_0", "kl_2_from_1"}


def ktg_options(**options):
    return method_options("ktg", **{"nodes": ["resnet8", "resnet8"], **options})


def np_ktg_kl(zt, zs, T):
    """Per sample: sum_c q log(q / (p + 1e-10) + 1e-10), q = softmax(zs / T), p = softmax(zt / T) (lib/loss_func.py)."""
    out = []
    for b in range(zt.shape[0]):
        p, q = np_softmax(zt[b] / T), np_softmax(zs[b] / T)
        out.append(sum(q[c] * math.log(q[c] / (p[c] + 1e-10) + 1e-10) for c in range(zt.shape[1])))
    return np.array(out)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kl_edge_matches_numpy_with_the_through_and_correct_gates(T):
    from kdbench.methods.ktg import ktg_edge_loss

    zt, zs = rand64(5, 4, seed=1, scale=2.0), rand64(5, 4, seed=2, scale=2.0)
    y = torch.tensor([int(v) for v in zs.argmax(1)])  # the source is right on ...
    y[1] = (y[1] + 1) % 4  # ... every sample but two
    y[3] = (y[3] + 2) % 4
    per = np_ktg_kl(zt.numpy(), zs.numpy(), T)
    close(ktg_edge_loss("kl", "through", zt, zs, y, T), T * T * per.mean())
    mask = np.array([1, 0, 1, 0, 1])
    close(ktg_edge_loss("kl", "correct", zt, zs, y, T), T * T * (per * mask).sum() / 5)
    close(ktg_edge_loss("kl", "linear", zt, zs, y, T), T * T * per.mean())  # the linear weight is a term weight


def test_ce_self_loop_is_the_batch_mean_cross_entropy_for_every_gate():
    from kdbench.methods.ktg import ktg_edge_loss

    z, y = rand64(4, 5, seed=3), torch.tensor([0, 4, 2, 1])
    want = sum(np_ce(z.numpy()[b], int(y[b])) for b in range(4)) / 4
    for gate in ("through", "correct", "linear"):  # a ce edge's "source" is the one-hot label: always correct
        close(ktg_edge_loss("ce", gate, z, None, y), want)


def test_a_kl_edge_never_sends_gradient_to_its_source():
    from kdbench.methods.ktg import ktg_edge_loss

    zt, zs = rand64(3, 4, seed=4).requires_grad_(True), rand64(3, 4, seed=5).requires_grad_(True)
    ktg_edge_loss("kl", "through", zt, zs, torch.tensor([0, 1, 2])).backward()
    assert zs.grad is None and zt.grad.abs().sum() > 0


def test_graph_validation_names_the_faulty_edge():
    from kdbench.methods.ktg import parse_edges

    ok = [{"target": 0, "source": 0, "loss": "ce", "gate": "through"},
          {"target": 1, "source": 0, "loss": "kl", "gate": "cutoff"},
          {"target": 1, "source": 1, "loss": "ce", "gate": "linear"}]
    assert [e["term"] for e in parse_edges(ok, 2)] == ["ce", "ce_1"]  # the cut-off edge has no term
    with pytest.raises(KDBenchError, match=r"node\(s\) \[1\] have no incoming edge"):
        parse_edges(ok[:1], 2)
    with pytest.raises(KDBenchError, match="a self-loop is a ce edge"):
        parse_edges([{"target": 0, "source": 0, "loss": "kl", "gate": "through"}], 1)
    with pytest.raises(KDBenchError, match="gate must be one of"):
        parse_edges([{"target": 0, "source": 0, "loss": "ce", "gate": "sometimes"}], 1)
    with pytest.raises(KDBenchError, match="outside 0..1"):
        parse_edges([*ok, {"target": 2, "source": 0, "loss": "kl", "gate": "through"}], 2)
    with pytest.raises(KDBenchError, match="listed twice"):
        parse_edges([*ok, ok[0]], 2)


def test_each_node_is_trained_by_its_own_edges_only():
    pair = make_pair(None, "resnet8")
    m = create_method(ktg_options(), pair)
    assert method_class("ktg").needs_teacher is False and m.node_names == ["resnet8"] * 3
    batch = make_batch(4, 10)
    terms = m.all_terms(batch, pair.student.forward_taps(batch.inputs, m.student_taps), None)
    assert set(terms) == TERMS
    (terms["ce_1"] + terms["kl_1_from_0"] + terms["kl_1_from_2"]).backward(retain_graph=True)
    assert all(p.grad is None for p in pair.student.parameters())
    assert all(p.grad is None for p in m.nodes[1].parameters())
    assert all(p.grad is not None for p in m.nodes[0].parameters())
    m.zero_grad(set_to_none=True)
    (terms["ce"] + terms["kl_0_from_1"] + terms["kl_0_from_2"]).backward()
    assert all(p.grad is None for p in m.parameters())
    z = [pair.student(batch.inputs), m.nodes[0](batch.inputs), m.nodes[1](batch.inputs)]
    close(terms["kl_2_from_0"], float(np_ktg_kl(z[2].detach().numpy(), z[0].detach().numpy(), 1.0).mean()), 1e-5)
    assert list(m.extra_heads()) == ["node1", "node2"]
    m.eval()
    torch.testing.assert_close(m.extra_heads()["node2"](pair.student, batch.inputs), m.nodes[1](batch.inputs))


def test_a_graph_with_linear_and_correct_gates_and_cut_edges():
    edges = [{"target": 0, "source": 0, "loss": "ce", "gate": "through"},
             {"target": 0, "source": 1, "loss": "kl", "gate": "linear"},
             {"target": 1, "source": 1, "loss": "ce", "gate": "correct"},
             {"target": 1, "source": 0, "loss": "kl", "gate": "cutoff"}]
    cfg = method_options("ktg", nodes=["resnet8"], edges=edges,
                         weights={"ce": 1.0, "kl_0_from_1": 2.0, "ce_1": 1.0})
    pair = make_pair(None, "resnet8", epochs=200)
    m = create_method(cfg, pair)
    for epoch, ramp in ((1, 0.5 / 200), (100, 99.5 / 200), (200, 199.5 / 200)):
        assert m.term_weights(epoch) == pytest.approx({"ce": 1.0, "kl_0_from_1": 2.0 * ramp, "ce_1": 1.0})
    batch = make_batch(4, 10)
    total, terms = m.loss(batch, pair.student.forward_taps(batch.inputs, ()), None, 100)
    assert set(terms) == {"ce", "kl_0_from_1", "ce_1"}
    close(total, float((terms["ce"] + 2.0 * 99.5 / 200 * terms["kl_0_from_1"] + terms["ce_1"]).detach()), 1e-6)


def test_ktg_on_resnet8x4_adds_two_whole_networks():
    pair = make_pair(None, "resnet8x4", num_classes=100, input_shape=(3, 32, 32))
    m = create_method(ktg_options(nodes=["resnet8x4", "resnet8x4"]), pair)
    assert count_parameters(m) == 2 * 1_233_540  # resnet8x4 at 100 classes (docs/taps.md)


def test_ktg_job_on_small_synthetic_data_records_every_node(run_job, tmp_path):
    record = run_job(*SMALL_SYNTHETIC, "student=resnet8", "method=ktg")
    assert_online_job(record, tmp_path, "ktg", ["node1", "node2"], TERMS)
    assert record["online"]["nodes"] == ["resnet8"] * 3 and len(record["online"]["edges"]) == 9


@pytest.mark.slow
@pytest.mark.parametrize("student, nodes", [("resnet8x4", None), ("resnet8x4", "[wrn_16_2,vgg8]")])
def test_ktg_job_trains_the_benchmark_student_with_nodes_of_its_own_and_other_families(run_job, tmp_path, student,
                                                                                      nodes):
    extra = [f"method.nodes={nodes}"] if nodes else []
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet32x4", f"student={student}", "method=ktg", *extra)
    assert_online_job(record, tmp_path, "ktg", ["node1", "node2"], TERMS)
    if nodes:
        assert record["online"]["nodes"] == ["resnet8x4", "wrn_16_2", "vgg8"]
