"""one (ONE, Lan et al. NeurIPS 2018): a multi-branch student (shared layers, copies of its last stage) with a gated
ensemble teacher; the loss against NumPy, the gate against a hand-written FC/BN/ReLU/softmax, the wiring, the extra
networks and one-epoch jobs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdbench.distill import create_method, method_class
from kdbench.errors import IncompatibleModels, KDBenchError
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair
from tests.helpers import close, method_options, np_softmax, rand64
from tests.methods.online_helpers import (SMALL_SYNTHETIC, assert_online_job, np_batchnorm_train, np_mean_ce,
                                          np_sigmoid_ramp, np_soft_kl)

TERMS = {"ce", "branch_ce", "ensemble_ce", "kl", "branch_kl"}


def one_options(**options):
    return method_options("one", branch_model="resnet8", **options)


def test_one_loss_matches_numpy_for_three_branches_and_a_gate():
    from kdbench.methods.one import one_loss

    B, K, T = 4, 6, 3.0
    zs = [rand64(B, K, seed=s, scale=2.0) for s in (1, 2, 3)]
    gate = torch.softmax(rand64(B, 3, seed=4), dim=1)
    y = torch.tensor([0, 5, 2, 3])
    got = one_loss(zs, gate, y, T)
    z, g = [v.numpy() for v in zs], gate.numpy()
    z_e = sum(g[:, i:i + 1] * z[i] for i in range(3))
    close(got["ce"], np_mean_ce(z[0], y))
    close(got["branch_ce"], np_mean_ce(z[1], y) + np_mean_ce(z[2], y))
    close(got["ensemble_ce"], np_mean_ce(z_e, y))
    close(got["kl"], np_soft_kl(z[0], z_e, T))
    close(got["branch_kl"], np_soft_kl(z[1], z_e, T) + np_soft_kl(z[2], z_e, T))


def test_gate_is_fc_batchnorm_relu_softmax_on_the_pooled_shared_map():
    from kdbench.methods.one import gate_weights

    x = rand64(5, 4, 3, 3, seed=7)
    fc = torch.nn.Linear(4, 3).double()
    bn = torch.nn.BatchNorm1d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    got = gate_weights(x, fc, bn)
    pooled = x.numpy().mean((2, 3))
    h = pooled @ fc.weight.detach().numpy().T + fc.bias.detach().numpy()
    h = np.maximum(np_batchnorm_train(h, np.array([1.5, 0.5, 2.0]), np.array([0.1, -0.2, 0.3])), 0)
    want = np.stack([np_softmax(row) for row in h])
    assert np.allclose(got.detach().numpy(), want, atol=1e-10) and np.allclose(want.sum(1), 1)


def test_the_ensemble_is_a_detached_target_of_every_kl_and_trained_only_by_its_own_ce():
    from kdbench.methods.one import one_loss

    zs = [rand64(3, 5, seed=s).requires_grad_(True) for s in (11, 12, 13)]
    gate_logits = rand64(3, 3, seed=14).requires_grad_(True)
    terms = one_loss(zs, torch.softmax(gate_logits, 1), torch.tensor([1, 2, 3]))
    terms["kl"].backward(retain_graph=True)
    assert gate_logits.grad is None and zs[1].grad is None and zs[0].grad.abs().sum() > 0
    terms["ensemble_ce"].backward()
    assert gate_logits.grad.abs().sum() > 0 and all(z.grad is not None for z in zs)


def test_kl_terms_ramp_up_as_the_code_does_and_the_paper_variant_has_no_ramp():
    pair = make_pair(None, "resnet8")
    m = create_method(one_options(), pair)
    for epoch in (1, 2, 41, 80, 81, 300):
        w = m.term_weights(epoch)
        ramp = np_sigmoid_ramp(epoch - 1, 80)
        assert w["kl"] == pytest.approx(ramp, rel=1e-12) and w["branch_kl"] == pytest.approx(ramp, rel=1e-12)
        assert w["ce"] == w["branch_ce"] == w["ensemble_ce"] == 1.0
    assert create_method(one_options(rampup_epochs=0), pair).term_weights(1)["kl"] == 1.0
    assert m.term_weights(1)["kl"] == pytest.approx(np.exp(-5.0))


def test_one_method_wires_the_branches_to_the_shared_stage2_and_the_heads_to_the_same_networks():
    pair = make_pair(None, "resnet8")
    m = create_method(one_options(), pair)
    assert method_class("one").needs_teacher is False and m.student_taps == ("stage2", "logits")
    assert len(m.tails) == 2 and m.gate_fc.out_features == 3
    batch = make_batch(4, 10)
    s_out = pair.student.forward_taps(batch.inputs, m.student_taps)
    terms = m.all_terms(batch, s_out, None)
    assert set(terms) == TERMS
    (terms["ce"] + terms["kl"]).backward(retain_graph=True)  # the student's own terms train only the student
    assert all(p.grad is None for p in m.parameters())
    assert any(p.grad is not None for p in pair.student.layer3.parameters())
    pair.student.zero_grad(set_to_none=True)
    terms["branch_ce"].backward()  # the branches' terms reach their tails and the shared layers, not the student's
    assert all(p.grad is None for p in pair.student.layer3.parameters()) and pair.student.conv1.weight.grad is not None
    assert all(p.grad is not None for p in m.tails.parameters())
    m.eval()
    pair.student.eval()
    heads = m.extra_heads()
    assert list(heads) == ["branch2", "branch3", "ensemble"]
    with torch.no_grad():
        out = pair.student.forward_taps(batch.inputs, m.student_taps)
        z = [out["logits"], m.tails[0](out["stage2"])[2], m.tails[1](out["stage2"])[2]]
        torch.testing.assert_close(heads["branch3"](pair.student, batch.inputs), z[2])
        g = m.gate(out)
        ensemble = sum(g[:, i:i + 1] * z[i] for i in range(3))
        torch.testing.assert_close(heads["ensemble"](pair.student, batch.inputs), ensemble)
    assert any(k.startswith("tails.1.") for k in m.state_dict())


def test_branches_start_from_their_own_initialisation():
    pair = make_pair(None, "resnet8")
    m = create_method(one_options(), pair)
    w = [pair.student.layer3[0].conv1.weight, m.tails[0].stage[0].conv1.weight, m.tails[1].stage[0].conv1.weight]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])


def test_one_on_resnet8x4_adds_two_last_stages_two_classifiers_and_the_gate():
    pair = make_pair(None, "resnet8x4", num_classes=100, input_shape=(3, 32, 32))
    m = create_method(method_options("one", branch_model="resnet8x4"), pair)
    # resnet8x4 layer3: one BasicBlock 128 -> 256, stride 2: two 3x3 convs, a 1x1 downsample conv, three BNs
    layer3 = 3 * 3 * 128 * 256 + 3 * 3 * 256 * 256 + 128 * 256 + 3 * 2 * 256
    fc = 256 * 100 + 100
    gate = 128 * 3 + 3 + 2 * 3  # Linear(128 -> 3) + BatchNorm1d(3)
    assert count_parameters(m) == 2 * (layer3 + fc) + gate == 1_889_873
    assert m.record_fields()["online"]["extra_params"] == {"branch2": layer3 + fc, "branch3": layer3 + fc, "gate": gate}


@pytest.mark.parametrize("student", ["MobileNetV2", "ShuffleV1"])
def test_one_refuses_a_student_without_a_last_stage_to_branch(student):
    pair = make_pair(None, student, input_shape=(3, 32, 32))
    with pytest.raises(IncompatibleModels, match=f"method 'one' cannot distill None -> {student}: .*last stage"):
        create_method(method_options("one", branch_model=student), pair)


def test_one_refuses_a_branch_model_of_another_architecture_and_fewer_than_two_branches():
    pair = make_pair(None, "resnet8")
    with pytest.raises(IncompatibleModels, match="branch model wrn_16_1 is not of the student's architecture"):
        create_method(method_options("one", branch_model="wrn_16_1"), pair)
    with pytest.raises(IncompatibleModels, match="branch model resnet8x4 cannot read the student's stage2"):
        create_method(method_options("one", branch_model="resnet8x4"), pair)
    with pytest.raises(KDBenchError, match="must be >= 2"):
        create_method(one_options(branches=1), pair)


def test_one_job_on_small_synthetic_data_records_the_branches_and_the_ensemble(run_job, tmp_path):
    record = run_job(*SMALL_SYNTHETIC, "student=resnet8", "method=one")
    assert_online_job(record, tmp_path, "one", ["branch2", "branch3", "ensemble"], TERMS)
    assert record["extra_params"] == sum(record["online"]["extra_params"].values())


@pytest.mark.slow
@pytest.mark.parametrize("student", ["resnet8x4", "wrn_16_2"])
def test_one_job_trains_the_benchmark_student_and_a_wrn(run_job, tmp_path, student):
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet32x4", f"student={student}", "method=one")
    assert_online_job(record, tmp_path, "one", ["branch2", "branch3", "ensemble"], TERMS)
    state = torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)
    assert any(k.startswith("tails.0.") for k in state["method"]) and "gate_fc.weight" in state["method"]
