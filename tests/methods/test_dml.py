"""dml (deep mutual learning): the student and its peers train together, each mimicking the others' (detached)
posteriors; the peers are parameters of the method (a resnet8x4 peer at 100 classes = 1,233,540 extra params)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from kdbench.distill import create_method, method_class
from kdbench.errors import KDBenchError
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, compose_config, make_batch, make_pair
from tests.helpers import close, method_options, np_ce, np_kl, np_softmax, rand64


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
def test_dml_loss_matches_numpy(mode):
    from kdbench.methods.dml import dml_loss

    B, K = 4, 5
    zs = rand64(B, K, seed=1, scale=2.0)
    peers = [rand64(B, K, seed=2, scale=2.0), rand64(B, K, seed=3, scale=2.0)]
    y = torch.tensor([0, 3, 4, 1])
    got = dml_loss(zs, peers, y, mode)
    members = [z.numpy() for z in [zs, *peers]]

    def mimic(k):
        acc = 0.0
        for i in range(B):
            q = np_softmax(members[k][i])
            others = [np_softmax(members[j][i]) for j in range(len(members)) if j != k]
            if mode == "pairwise":
                acc += sum(np_kl(p, q) for p in others) / len(others)
            else:
                acc += np_kl(sum(others) / len(others), q)
        return acc / B

    ce = lambda z: sum(np_ce(z[i], int(y[i])) for i in range(B)) / B  # noqa: E731
    close(got["ce"], ce(members[0]))
    close(got["mimic"], mimic(0))
    close(got["peer_ce"], ce(members[1]) + ce(members[2]))
    close(got["peer_mimic"], mimic(1) + mimic(2))


def test_dml_with_two_members_modes_agree_and_are_symmetric_kls():
    from kdbench.methods.dml import dml_loss

    zs, zp, y = rand64(3, 4, seed=5, scale=2.0), rand64(3, 4, seed=6, scale=2.0), torch.tensor([1, 2, 0])
    a, b = dml_loss(zs, [zp], y, "pairwise"), dml_loss(zs, [zp], y, "ensemble")
    for k in a:
        close(a[k], float(b[k]))
    s, p = zs.numpy(), zp.numpy()
    close(a["mimic"], sum(np_kl(np_softmax(p[i]), np_softmax(s[i])) for i in range(3)) / 3)
    close(a["peer_mimic"], sum(np_kl(np_softmax(s[i]), np_softmax(p[i])) for i in range(3)) / 3)


def test_dml_mimic_targets_are_detached():
    from kdbench.methods.dml import dml_loss

    zs = rand64(3, 4, seed=7, scale=2.0).requires_grad_(True)
    zp = rand64(3, 4, seed=8, scale=2.0).requires_grad_(True)
    terms = dml_loss(zs, [zp], torch.tensor([0, 1, 2]))
    terms["mimic"].backward()
    assert zp.grad is None and zs.grad.abs().sum() > 0
    zs.grad = None
    terms["peer_mimic"].backward()
    assert zs.grad is None and zp.grad.abs().sum() > 0


def test_dml_method_builds_trainable_peers_with_gradient_only_through_own_terms():
    pair = make_pair(None, "resnet8")
    m = create_method(method_options("dml", peers=["resnet8"]), pair)
    assert method_class("dml").needs_teacher is False
    assert len(m.peers) == 1 and count_parameters(m) == count_parameters(pair.student)
    batch = make_batch(4, 10)
    batch.targets = batch.indices * 3 % 10  # targets 0, 3, 6, 9
    m.train()
    s_out = pair.student.forward_taps(batch.inputs, m.student_taps)
    terms = m.all_terms(batch, s_out, None)
    assert set(terms) == {"ce", "mimic", "peer_ce", "peer_mimic"} and all(torch.isfinite(v) for v in terms.values())
    # the student's terms reach only the student; the peer terms only the peer
    (terms["ce"] + terms["mimic"]).backward(retain_graph=True)
    assert all(p.grad is None for p in m.peers.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pair.student.parameters())
    pair.student.zero_grad(set_to_none=True)
    (terms["peer_ce"] + terms["peer_mimic"]).backward()
    assert all(p.grad is None for p in pair.student.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.peers.parameters())
    total, _ = m.loss(batch, pair.student.forward_taps(batch.inputs, m.student_taps), None, 1)
    assert torch.isfinite(total)
    assert any(k.startswith("peers.0.") for k in m.state_dict())  # peers go into the run checkpoint


def test_dml_peer_entries_accept_model_configs_and_reject_bad_options():
    pair = make_pair(None, "resnet8")
    m = create_method(method_options("dml", peers=[{"name": "resnet8"}, "resnet14"], mimic="ensemble"), pair)
    assert m.peer_names == ["resnet8", "resnet14"] and m.mimic_mode == "ensemble"
    with pytest.raises(KDBenchError, match="mimic"):
        create_method(method_options("dml", peers=["resnet8"], mimic="bogus"), pair)
    with pytest.raises(KDBenchError, match="at least one peer"):
        create_method(method_options("dml", peers=[]), pair)


def test_dml_with_one_resnet8x4_peer_at_100_classes_adds_1233540_parameters():
    pair = make_pair(None, "resnet8x4", num_classes=100, input_shape=(3, 32, 32))
    m = create_method(method_options("dml", peers=["resnet8x4"]), pair)
    assert count_parameters(m) == count_parameters(pair.student) == 1_233_540


def test_dml_yaml_default_peer_is_the_students_architecture():
    cfg = compose_config(["method=dml", "student=resnet8x4"])
    assert OmegaConf.to_container(cfg.method.peers, resolve=True) == [{"name": "resnet8x4"}]


@pytest.mark.slow
def test_dml_job_trains_and_checkpoints_its_peer(run_job, tmp_path):
    record = run_job(*TINY_SYNTHETIC, "student=resnet8x4", "method=dml")
    assert record["status"] == "completed" and record["method"] == "dml" and record["teacher"] is None
    assert len(record["history"]) == 1 and 0 <= record["last_top1"] <= 100
    assert set(record["history"][0]["train"]) == {"loss", "ce", "mimic", "peer_ce", "peer_mimic"}
    assert record["extra_params"] == record["student_params"]
    state = torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)
    assert any(k.startswith("peers.0.") for k in state["method"])
