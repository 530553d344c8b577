"""okddip (OKDDip, Chen et al. AAAI 2020): auxiliary peers learning from attention-weighted aggregates of the peers,
a group leader (the student) learning from the peers' mean; the loss and the attention against NumPy, the gradient
through the targets (the code's KL_Loss does not detach), the wiring, the extra networks and one-epoch jobs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdbench.distill import create_method, method_class
from kdbench.errors import IncompatibleModels, KDBenchError
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair
from tests.helpers import close, method_options, np_softmax, rand64
from tests.methods.online_helpers import (SMALL_SYNTHETIC, assert_online_job, np_mean_ce, np_sigmoid_ramp,
                                          np_soft_kl)

TERMS = {"ce", "peer_ce", "peer_kl", "leader_kl"}
HEADS = ["peer1", "peer2", "peer3", "ensemble"]


def okddip_options(**options):
    return method_options("okddip", peer_model="resnet8", **options)


def test_peer_attention_is_a_softmax_over_peers_of_query_key_products():
    from kdbench.methods.okddip import peer_attention

    q, k = rand64(2, 3, 4, seed=1), rand64(2, 3, 4, seed=2)
    got = peer_attention(q, k).numpy()
    for b in range(2):
        for i in range(3):
            want = np_softmax(np.array([q[b, i].numpy() @ k[b, j].numpy() for j in range(3)]))
            assert np.allclose(got[b, i], want, atol=1e-12)


def test_okddip_loss_matches_numpy():
    from kdbench.methods.okddip import okddip_loss

    B, K, T = 4, 5, 3.0
    peers = [rand64(B, K, seed=s, scale=2.0) for s in (3, 4, 5)]
    leader = rand64(B, K, seed=6, scale=2.0)
    att = torch.softmax(rand64(B, 3, 3, seed=7), dim=-1)
    y = torch.tensor([4, 0, 1, 2])
    got = okddip_loss(peers, att, leader, y, T)
    z, a = [p.numpy() for p in peers], att.numpy()
    targets = [np.stack([sum(a[b, i, j] * z[j][b] for j in range(3)) for b in range(B)]) for i in range(3)]
    close(got["ce"], np_mean_ce(leader.numpy(), y))
    close(got["peer_ce"], sum(np_mean_ce(zi, y) for zi in z))
    close(got["peer_kl"], sum(np_soft_kl(z[i], targets[i], T) for i in range(3)))
    close(got["leader_kl"], np_soft_kl(leader.numpy(), sum(z) / 3, T))


@pytest.mark.parametrize("detach", [False, True])
def test_the_targets_carry_gradient_as_in_the_code_unless_detached(detach):
    from kdbench.methods.okddip import okddip_loss

    peers = [rand64(3, 4, seed=s).requires_grad_(True) for s in (8, 9)]
    leader = rand64(3, 4, seed=10).requires_grad_(True)
    att_logits = rand64(3, 2, 2, seed=11).requires_grad_(True)
    terms = okddip_loss(peers, torch.softmax(att_logits, -1), leader, torch.tensor([0, 1, 2]), detach_targets=detach)
    terms["leader_kl"].backward(retain_graph=True)
    assert leader.grad.abs().sum() > 0
    assert (peers[0].grad is None) == detach  # the leader's KL reaches the peers only through an undetached target
    terms["peer_kl"].backward()
    assert (att_logits.grad is None) == detach


def test_kl_terms_ramp_up_over_80_epochs():
    m = create_method(okddip_options(), make_pair(None, "resnet8"))
    for epoch in (1, 30, 81, 300):
        w = m.term_weights(epoch)
        assert w["peer_kl"] == w["leader_kl"] == pytest.approx(np_sigmoid_ramp(epoch - 1, 80), rel=1e-12)
        assert w["ce"] == w["peer_ce"] == 1.0


def test_okddip_wires_peers_to_the_shared_map_and_its_heads_to_the_peers_and_their_mean():
    pair = make_pair(None, "resnet8")
    m = create_method(okddip_options(), pair)
    assert method_class("okddip").needs_teacher is False and m.student_taps == ("stage2", "logits")
    assert len(m.peer_nets) == 3 and (m.query.in_features, m.query.out_features) == (64, 8) and m.query.bias is None
    batch = make_batch(4, 10)
    s_out = pair.student.forward_taps(batch.inputs, m.student_taps)
    terms = m.all_terms(batch, s_out, None)
    assert set(terms) == TERMS
    terms["peer_kl"].backward(retain_graph=True)
    assert m.query.weight.grad.abs().sum() > 0 and m.key.weight.grad.abs().sum() > 0  # the attention learns
    m.zero_grad(set_to_none=True)
    terms["ce"].backward()  # the leader's CE stays in the student
    assert all(p.grad is None for p in m.parameters())
    m.eval()
    pair.student.eval()
    heads = m.extra_heads()
    assert list(heads) == HEADS
    with torch.no_grad():
        x = pair.student.forward_taps(batch.inputs, ("stage2",))["stage2"]
        z = [net(x)[2] for net in m.peer_nets]
        torch.testing.assert_close(heads["peer2"](pair.student, batch.inputs), z[1])
        torch.testing.assert_close(heads["ensemble"](pair.student, batch.inputs), sum(z) / 3)


def test_network_based_peers_are_whole_networks():
    pair = make_pair(None, "resnet8")
    m = create_method(okddip_options(share="none"), pair)
    assert m.student_taps == ()  # the peers read the inputs, not a shared map
    assert count_parameters(m) == 3 * count_parameters(pair.student) + 2 * 64 * 8
    batch = make_batch(4, 10)
    terms = m.all_terms(batch, pair.student.forward_taps(batch.inputs, m.student_taps), None)
    assert set(terms) == TERMS and all(torch.isfinite(v) for v in terms.values())


def test_okddip_on_resnet8x4_adds_three_last_stages_three_classifiers_and_the_projections():
    pair = make_pair(None, "resnet8x4", num_classes=100, input_shape=(3, 32, 32))
    m = create_method(method_options("okddip", peer_model="resnet8x4"), pair)
    layer3 = 3 * 3 * 128 * 256 + 3 * 3 * 256 * 256 + 128 * 256 + 3 * 2 * 256
    fc = 256 * 100 + 100
    projections = 2 * 256 * (256 // 8)
    assert count_parameters(m) == 3 * (layer3 + fc) + projections == 2_850_604


def test_okddip_refuses_what_it_cannot_build():
    with pytest.raises(IncompatibleModels, match="method 'okddip' cannot distill None -> MobileNetV2: .*last stage"):
        create_method(method_options("okddip", peer_model="MobileNetV2"), make_pair(None, "MobileNetV2",
                                                                                   input_shape=(3, 32, 32)))
    pair = make_pair(None, "resnet8")
    with pytest.raises(KDBenchError, match="share must be one of"):
        create_method(okddip_options(share="bogus"), pair)
    with pytest.raises(KDBenchError, match="must be >= 1"):
        create_method(okddip_options(peers=0), pair)


def test_okddip_job_on_small_synthetic_data_records_the_peers_and_their_ensemble(run_job, tmp_path):
    record = run_job(*SMALL_SYNTHETIC, "student=resnet8", "method=okddip")
    assert_online_job(record, tmp_path, "okddip", HEADS, TERMS)
    assert record["online"]["share"] == "branch"


@pytest.mark.slow
@pytest.mark.parametrize("student, extra", [("resnet8x4", []), ("MobileNetV2", ["method.share=none"])])
def test_okddip_job_trains_the_benchmark_student_and_network_peers_of_another_family(run_job, tmp_path, student,
                                                                                     extra):
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet32x4", f"student={student}", "method=okddip", *extra)
    assert_online_job(record, tmp_path, "okddip", HEADS, TERMS)
    state = torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)
    assert "query.weight" in state["method"] and any(k.startswith("peer_nets.2.") for k in state["method"])
