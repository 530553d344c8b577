"""ffl (FFL, Kim et al. ICPR 2020): two sub-networks and a fusion classifier over their last-stage maps; the loss and
the fusion module against NumPy, the fusion module's own weight decay (the code's second optimizer), the wiring, the
extra networks and one-epoch jobs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdbench.distill import create_method, method_class
from kdbench.errors import IncompatibleModels, KDBenchError
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair
from tests.helpers import close, method_options, rand64
from tests.methods.online_helpers import (SMALL_SYNTHETIC, assert_online_job, np_batchnorm_train, np_mean_ce,
                                          np_sigmoid_ramp, np_soft_kl)

TERMS = {"ce", "sub_ce", "fused_ce", "kl", "sub_kl", "fused_kl"}


def ffl_options(**options):
    return method_options("ffl", **{"peer_model": "resnet8", "run_weight_decay": 5e-4, **options})


def test_ffl_loss_matches_numpy():
    from kdbench.methods.ffl import ffl_loss

    B, K, T = 4, 6, 3.0
    z1, z2, zf = (rand64(B, K, seed=s, scale=2.0) for s in (1, 2, 3))
    y = torch.tensor([0, 1, 5, 3])
    got = ffl_loss([z1, z2], zf, y, T)
    a, b, f = z1.numpy(), z2.numpy(), zf.numpy()
    close(got["ce"], np_mean_ce(a, y))
    close(got["sub_ce"], np_mean_ce(b, y))
    close(got["fused_ce"], np_mean_ce(f, y))
    close(got["kl"], np_soft_kl(a, f, T))
    close(got["sub_kl"], np_soft_kl(b, f, T))
    close(got["fused_kl"], np_soft_kl(f, (a + b) / 2, T))


def test_every_kl_target_is_detached():
    from kdbench.methods.ffl import ffl_loss

    z1, z2, zf = (rand64(3, 4, seed=s).requires_grad_(True) for s in (4, 5, 6))
    terms = ffl_loss([z1, z2], zf, torch.tensor([0, 1, 2]))
    (terms["kl"] + terms["sub_kl"]).backward(retain_graph=True)
    assert zf.grad is None and z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    z1.grad = z2.grad = None
    terms["fused_kl"].backward()
    assert z1.grad is None and z2.grad is None and zf.grad.abs().sum() > 0


def _np_fusion(f1, f2, m):
    """The fusion module by explicit loops: depthwise 3x3 (pad 1), BN (train), ReLU, 1x1 conv, BN, ReLU, mean,
    Linear."""
    x = np.concatenate([f1, f2], axis=1)
    n, c, h, w = x.shape
    k = m.dwconv.weight.detach().numpy()
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    dw = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            dw[:, :, i, j] = (pad[:, :, i:i + 3, j:j + 3] * k[None, :, 0]).sum((2, 3))

    def bn(v, mod):
        flat = v.transpose(0, 2, 3, 1).reshape(-1, v.shape[1])
        out = np_batchnorm_train(flat, mod.weight.detach().numpy(), mod.bias.detach().numpy(), mod.eps)
        return out.reshape(v.shape[0], v.shape[2], v.shape[3], v.shape[1]).transpose(0, 3, 1, 2)

    a = np.maximum(bn(dw, m.bn1), 0)
    pw = np.einsum("oc,nchw->nohw", m.pwconv.weight.detach().numpy()[:, :, 0, 0], a)
    b = np.maximum(bn(pw, m.bn2), 0)
    return b.mean((2, 3)) @ m.fc.weight.detach().numpy().T + m.fc.bias.detach().numpy()


def test_fusion_module_matches_depthwise_pointwise_pooled_linear_by_hand():
    from kdbench.methods.ffl import FusionModule

    torch.manual_seed(0)
    m = FusionModule((2, 3), 4, 5).double()
    f1, f2 = rand64(3, 2, 4, 4, seed=7), rand64(3, 3, 4, 4, seed=8)
    got = m([f1, f2]).detach().numpy()
    assert np.allclose(got, _np_fusion(f1.numpy(), f2.numpy(), m), atol=1e-9)
    assert m.dwconv.groups == 5 and m.dwconv.bias is None and m.pwconv.bias is None
    assert int(m.bn1.num_batches_tracked) == 1  # the running statistics move as nn.BatchNorm2d's do
    m.eval()
    ref = torch.nn.Sequential(m.dwconv, m.bn1, torch.nn.ReLU(), m.pwconv, m.bn2, torch.nn.ReLU())
    torch.testing.assert_close(m([f1, f2]), m.fc(ref(torch.cat([f1, f2], 1)).mean((2, 3))))


def test_the_fusion_module_steps_with_its_own_weight_decay_inside_the_runs_optimizer():
    """SGD(wd 1e-4) over the delta-adjusted module = SGD(wd 1e-5) over a plain copy (the code's second optimizer)."""
    from kdbench.methods.ffl import FusionModule

    torch.manual_seed(1)
    adjusted = FusionModule((2, 2), 2, 3, decay_delta=1e-5 - 1e-4).double()
    plain = FusionModule((2, 2), 2, 3).double()
    plain.load_state_dict(adjusted.state_dict())
    f = [rand64(4, 2, 3, 3, seed=9), rand64(4, 2, 3, 3, seed=10)]
    y = torch.tensor([0, 1, 2, 0])
    opt_a = torch.optim.SGD(adjusted.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-5)
    for _ in range(3):
        for mod, opt in ((adjusted, opt_a), (plain, opt_p)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(mod(f), y).backward()
            opt.step()
    for (name, a), b in zip(adjusted.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)


def test_the_fusion_decay_offset_is_the_configured_decay_minus_the_runs():
    pair = make_pair(None, "resnet8")
    m = create_method(ffl_options(), pair)
    assert m.fusion.decay_delta == pytest.approx(1e-5 - 5e-4)
    assert create_method(ffl_options(fusion_weight_decay=None), pair).fusion.decay_delta == 0.0
    with pytest.raises(KDBenchError, match="run_weight_decay"):
        create_method(method_options("ffl", peer_model="resnet8", run_weight_decay=None), pair)


def test_kl_terms_ramp_up_over_80_epochs():
    m = create_method(ffl_options(), make_pair(None, "resnet8"))
    for epoch in (1, 50, 81, 300):
        w = m.term_weights(epoch)
        assert w["kl"] == w["sub_kl"] == w["fused_kl"] == pytest.approx(np_sigmoid_ramp(epoch - 1, 80), rel=1e-12)
        assert w["ce"] == w["sub_ce"] == w["fused_ce"] == 1.0


def test_ffl_fuses_the_students_last_stage_with_the_branch_and_reports_both_as_heads():
    pair = make_pair(None, "resnet8")
    m = create_method(ffl_options(), pair)
    assert method_class("ffl").needs_teacher is False and m.student_taps == ("stage2", "stage3", "logits")
    batch = make_batch(4, 10)
    s_out = pair.student.forward_taps(batch.inputs, m.student_taps)
    terms = m.all_terms(batch, s_out, None)
    assert set(terms) == TERMS
    terms["fused_ce"].backward(retain_graph=True)  # the fused classifier trains the fusion, both stages and the trunk
    assert all(p.grad is not None for p in m.fusion.parameters())
    assert pair.student.layer3[0].conv1.weight.grad is not None and m.sub2.stage[0].conv1.weight.grad is not None
    m.eval()
    pair.student.eval()
    heads = m.extra_heads()
    assert list(heads) == ["sub2", "fused"]
    with torch.no_grad():
        out = pair.student.forward_taps(batch.inputs, m.student_taps)
        f2, _, z2 = m.sub2(out["stage2"])
        torch.testing.assert_close(heads["sub2"](pair.student, batch.inputs), z2)
        torch.testing.assert_close(heads["fused"](pair.student, batch.inputs), m.fusion([out["stage3"], f2]))


def test_a_heterogeneous_second_network_is_fused_when_its_map_has_the_students_size():
    pair = make_pair(None, "resnet8", input_shape=(3, 32, 32))
    m = create_method(ffl_options(share="none", peer_model="wrn_16_2"), pair)
    assert m.student_taps == ("stage3", "logits") and m.peer_tap == "stage3"
    assert m.fusion.dwconv.in_channels == 64 + 128 and m.fusion.pwconv.out_channels == 64
    batch = make_batch(2, 10, (3, 32, 32))
    terms = m.all_terms(batch, pair.student.forward_taps(batch.inputs, m.student_taps), None)
    assert set(terms) == TERMS and all(torch.isfinite(v) for v in terms.values())
    with pytest.raises(IncompatibleModels, match="same H x W"):
        create_method(ffl_options(share="none", peer_model="vgg8"), pair)


def test_ffl_on_resnet8x4_adds_a_last_stage_a_classifier_and_the_fusion_module():
    pair = make_pair(None, "resnet8x4", num_classes=100, input_shape=(3, 32, 32))
    m = create_method(method_options("ffl", peer_model="resnet8x4", run_weight_decay=5e-4), pair)
    layer3 = 3 * 3 * 128 * 256 + 3 * 3 * 256 * 256 + 128 * 256 + 3 * 2 * 256
    fc = 256 * 100 + 100
    fusion = 512 * 9 + 2 * 512 + 512 * 256 + 2 * 256 + 256 * 100 + 100  # depthwise, BN, 1x1, BN, Linear
    assert count_parameters(m) == layer3 + fc + fusion == 1_107_656


def test_ffl_refuses_a_student_without_a_last_stage_to_branch():
    with pytest.raises(IncompatibleModels, match="method 'ffl' cannot distill None -> MobileNetV2: .*last stage"):
        create_method(method_options("ffl", peer_model="MobileNetV2", run_weight_decay=5e-4),
                      make_pair(None, "MobileNetV2", input_shape=(3, 32, 32)))


def test_ffl_job_on_small_synthetic_data_records_the_second_network_and_the_fused_classifier(run_job, tmp_path):
    record = run_job(*SMALL_SYNTHETIC, "student=resnet8", "method=ffl")
    assert_online_job(record, tmp_path, "ffl", ["sub2", "fused"], TERMS)
    assert record["online"]["fusion_weight_decay"] == 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("student, extra", [("resnet8x4", []),
                                            ("resnet8x4", ["method.share=none", "method.peer_model=wrn_16_2"])])
def test_ffl_job_trains_the_benchmark_student_alone_and_with_a_wrn(run_job, tmp_path, student, extra):
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet32x4", f"student={student}", "method=ffl", *extra)
    assert_online_job(record, tmp_path, "ffl", ["sub2", "fused"], TERMS)
    state = torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)
    assert "fusion.dwconv.weight" in state["method"]


def test_the_ffl_experiment_gives_the_fusion_module_1e_5_against_the_networks_1e_4():
    from tests.conftest import resolve_job

    job = resolve_job(["experiment=ffl_cifar100", "pair=none-resnet32", "method=ffl"])
    assert job.optim.weight_decay == 1e-4 and job.optim.nesterov is True
    pair = make_pair(None, "resnet32", num_classes=100, input_shape=(3, 32, 32))
    m = create_method(job.method, pair)
    assert m.fusion.decay_delta == pytest.approx(1e-5 - 1e-4)
