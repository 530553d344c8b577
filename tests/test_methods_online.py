"""Teacher-free / online methods: dml (Deep Mutual Learning) and tf_kd / tf_kd_self (Teacher-free KD).

Losses are checked against float64 NumPy loops; detached sides get no gradient; DML's peers are parameters of the
method (resnet8x4 peer at 100 classes = 1,233,540 extra params); (slow) one-epoch end-to-end runs.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdbench.config import CONF_DIR
from kdbench.data.loader import Batch
from kdbench.distill import PairInfo, create_method, method_class
from kdbench.errors import IncompatibleModels, KDBenchError
from kdbench.models import count_parameters, create_model, probe_taps
from tests.conftest import TINY_SYNTHETIC

CONF = CONF_DIR / "method"


def method_cfg(name: str, **options):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    for key, value in options.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def make_pair(student: str, teacher: str | None = None, num_classes: int = 10, input_shape=(3, 16, 16)) -> PairInfo:
    torch.manual_seed(0)
    s = create_model(student, num_classes=num_classes, input_shape=input_shape)
    t = create_model(teacher, num_classes=num_classes, input_shape=input_shape) if teacher else None
    return PairInfo(s, t, probe_taps(s, input_shape), probe_taps(t, input_shape) if t else None, student, teacher,
                    num_classes, torch.arange(40) % num_classes, 240, 0.05, tuple(input_shape))


def make_batch(n: int, num_classes: int, input_shape=(3, 16, 16)) -> Batch:
    x = torch.randn(n, *input_shape, generator=torch.Generator().manual_seed(1))
    idx = torch.arange(n)
    return Batch(x, (idx * 3) % num_classes, idx, torch.zeros(n, 2, dtype=torch.long), torch.zeros(n, dtype=torch.bool))


def rand64(*shape, seed=0, scale=2.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def close(value, expected, tol=1e-6):
    value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    assert abs(value - expected) <= tol * max(1.0, abs(expected)), (value, expected)


def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def np_kl(p, q):
    return sum(p[k] * (math.log(p[k]) - math.log(q[k])) for k in range(len(p)))


def np_ce(z, y):
    return -math.log(np_softmax(z)[y])


# ----------------------------------------------------------------------------- DML


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
def test_dml_loss_matches_numpy(mode):
    from kdbench.methods.dml import dml_loss

    B, K = 4, 5
    zs = rand64(B, K, seed=1)
    peers = [rand64(B, K, seed=2), rand64(B, K, seed=3)]
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


def test_dml_two_members_modes_agree_and_are_symmetric_kls():
    from kdbench.methods.dml import dml_loss

    zs, zp, y = rand64(3, 4, seed=5), rand64(3, 4, seed=6), torch.tensor([1, 2, 0])
    a, b = dml_loss(zs, [zp], y, "pairwise"), dml_loss(zs, [zp], y, "ensemble")
    for k in a:
        close(a[k], float(b[k]))
    s, p = zs.numpy(), zp.numpy()
    close(a["mimic"], sum(np_kl(np_softmax(p[i]), np_softmax(s[i])) for i in range(3)) / 3)
    close(a["peer_mimic"], sum(np_kl(np_softmax(s[i]), np_softmax(p[i])) for i in range(3)) / 3)


def test_dml_mimic_targets_are_detached():
    from kdbench.methods.dml import dml_loss

    zs = rand64(3, 4, seed=7).requires_grad_(True)
    zp = rand64(3, 4, seed=8).requires_grad_(True)
    terms = dml_loss(zs, [zp], torch.tensor([0, 1, 2]))
    terms["mimic"].backward()
    assert zp.grad is None and zs.grad.abs().sum() > 0
    zs.grad = None
    terms["peer_mimic"].backward()
    assert zs.grad is None and zp.grad.abs().sum() > 0


def test_dml_method_builds_trainable_peers_with_gradient_only_through_own_terms():
    pair = make_pair("resnet8")
    m = create_method(method_cfg("dml", peers=["resnet8"]), pair)
    assert method_class("dml").needs_teacher is False
    assert len(m.peers) == 1 and count_parameters(m) == count_parameters(pair.student)
    batch = make_batch(4, 10)
    m.train()
    s_out = pair.student.forward_taps(batch.inputs, m.student_taps)
    terms = m.terms(batch, s_out, None)
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
    pair = make_pair("resnet8")
    m = create_method(method_cfg("dml", peers=[{"name": "resnet8"}, "resnet14"], mimic="ensemble"), pair)
    assert m.peer_names == ["resnet8", "resnet14"] and m.mimic_mode == "ensemble"
    with pytest.raises(KDBenchError, match="mimic"):
        create_method(method_cfg("dml", peers=["resnet8"], mimic="bogus"), pair)
    with pytest.raises(KDBenchError, match="at least one peer"):
        create_method(method_cfg("dml", peers=[]), pair)


def test_dml_extra_params_one_resnet8x4_peer_at_100_classes():
    pair = make_pair("resnet8x4", num_classes=100, input_shape=(3, 32, 32))
    m = create_method(method_cfg("dml", peers=["resnet8x4"]), pair)
    assert count_parameters(m) == count_parameters(pair.student) == 1_233_540


def test_dml_yaml_default_peer_is_the_students_architecture():
    from tests.conftest import compose_config

    cfg = compose_config(["method=dml", "student=resnet8x4"])
    assert OmegaConf.to_container(cfg.method.peers, resolve=True) == [{"name": "resnet8x4"}]


# ----------------------------------------------------------------------------- Tf-KD


def test_virtual_teacher_distribution():
    from kdbench.methods.tf_kd import virtual_teacher

    p = virtual_teacher(torch.tensor([2, 0]), 5, 0.9)
    expected = np.full((2, 5), 0.1 / 4)
    expected[0, 2] = expected[1, 0] = 0.9
    np.testing.assert_allclose(p.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(p.sum(1).numpy(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("temperature,a", [(20.0, 0.99), (1.0, 0.9), (4.0, 0.5)])
def test_tf_kd_reg_loss_matches_numpy(temperature, a):
    from kdbench.methods.tf_kd import tf_kd_reg_loss

    B, K = 4, 6
    z = rand64(B, K, seed=11)
    y = torch.tensor([5, 0, 2, 2])
    acc = 0.0
    for i in range(B):
        pd = np.array([a if k == int(y[i]) else (1 - a) / (K - 1) for k in range(K)])
        acc += np_kl(np_softmax(pd / temperature), np_softmax(z[i].numpy()))
    close(tf_kd_reg_loss(z, y, temperature, a), acc / B, tol=1e-5)


def test_tf_kd_reg_loss_equals_reference_code_reduction_mapping():
    """alpha * multiplier * KLDivLoss(mean over B*K) (the authors' code) == (alpha * multiplier / K) * ours."""
    from kdbench.methods.tf_kd import tf_kd_reg_loss, virtual_teacher

    z, y = rand64(3, 100, seed=12), torch.tensor([4, 50, 99])
    target = torch.softmax(virtual_teacher(y, 100, 0.99).double() / 20, dim=1)
    code = torch.nn.functional.kl_div(torch.log_softmax(z, 1), target, reduction="sum") / z.numel() * 100.0  # nn.KLDivLoss()
    close(tf_kd_reg_loss(z, y, 20.0, 0.99), float(code))


def test_tf_kd_methods_terms_and_gradients():
    pair = make_pair("resnet8", "resnet8")
    batch = make_batch(6, 10)
    reg = create_method(method_cfg("tf_kd"), pair)
    assert method_class("tf_kd").needs_teacher is False and count_parameters(reg) == 0
    s_out = pair.student.forward_taps(batch.inputs, reg.student_taps)
    terms = reg.terms(batch, s_out, None)
    assert set(terms) == {"ce", "tf_kd"} and all(torch.isfinite(v) for v in terms.values())
    terms["tf_kd"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pair.student.parameters())

    self_kd = create_method(method_cfg("tf_kd_self"), pair)
    assert method_class("tf_kd_self").needs_teacher is True and self_kd.teacher_taps == ("logits",)
    pair.teacher.requires_grad_(True)
    pair.teacher.zero_grad(set_to_none=True)
    t_out = pair.teacher.forward_taps(batch.inputs, self_kd.teacher_taps)  # with grad, to catch any leak
    s_out = pair.student.forward_taps(batch.inputs, self_kd.student_taps)
    terms = self_kd.terms(batch, s_out, t_out)
    assert set(terms) == {"ce", "kd"}
    terms["kd"].backward()
    assert all(p.grad is None for p in pair.teacher.parameters())
    pair.teacher.requires_grad_(False)
    z_s, z_t, T = s_out["logits"].detach().double().numpy(), t_out["logits"].detach().double().numpy(), 6.0
    expected = T**2 * sum(np_kl(np_softmax(z_t[i] / T), np_softmax(z_s[i] / T)) for i in range(6)) / 6
    close(terms["kd"], expected, tol=1e-4)


def test_tf_kd_self_requires_the_students_architecture():
    with pytest.raises(IncompatibleModels, match="own architecture"):
        create_method(method_cfg("tf_kd_self"), make_pair("resnet8", "resnet14"))
    create_method(method_cfg("tf_kd_self", require_same_architecture=False), make_pair("resnet8", "resnet14"))
    same = make_pair("resnet8", "resnet8")
    same.teacher.requires_grad_(False)  # the trainer freezes the teacher; the check must count all its parameters
    create_method(method_cfg("tf_kd_self"), same)


def test_tf_kd_rejects_bad_options():
    pair = make_pair("resnet8")
    with pytest.raises(KDBenchError, match="correct_prob"):
        create_method(method_cfg("tf_kd", correct_prob=1.5), pair)
    with pytest.raises(KDBenchError, match="temperature"):
        create_method(method_cfg("tf_kd", temperature=0.0), pair)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_smoke_dml(run_job, tmp_path):
    record = run_job(*TINY_SYNTHETIC, "student=resnet8x4", "method=dml")
    assert record["status"] == "completed" and record["method"] == "dml" and record["teacher"] is None
    assert len(record["history"]) == 1 and 0 <= record["last_top1"] <= 100
    assert set(record["history"][0]["train"]) == {"loss", "ce", "mimic", "peer_ce", "peer_mimic"}
    assert record["extra_params"] == record["student_params"]
    state = torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)
    assert any(k.startswith("peers.0.") for k in state["method"])


@pytest.mark.slow
def test_smoke_tf_kd(run_job):
    record = run_job(*TINY_SYNTHETIC, "student=resnet8x4", "method=tf_kd")
    assert record["status"] == "completed" and record["teacher"] is None and record["extra_params"] == 0
    assert set(record["history"][0]["train"]) == {"loss", "ce", "tf_kd"}


@pytest.mark.slow
def test_smoke_tf_kd_self(run_job, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "resnet8x4.pt"
    torch.save({"model": create_model("resnet8x4", num_classes=10, input_shape=(3, 32, 32)).state_dict()}, ckpt)
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet8x4", "student=resnet8x4", "method=tf_kd_self",
                     f"teacher.checkpoint={ckpt}")
    assert record["status"] == "completed" and record["teacher"] == "resnet8x4"
    assert set(record["history"][0]["train"]) == {"loss", "ce", "kd"}


def test_ban_generations_chain_on_digits(run_job):
    chain = ["teacher=mlp_32", "+teacher@teacher.distill.from=mlp_32", "+method@teacher.distill.method=ban",
             "method=ban", "trainer.epochs=2", "trainer.progress=false"]
    rec = run_job(*chain)
    assert rec["status"] == "completed" and rec["method"] == "ban"
    assert rec["teacher_source"]["distilled_from"] == "mlp_32" and rec["teacher_source"]["distill_method"] == "ban"


def test_ban_experiment_composes():
    from tests.conftest import compose_config

    cfg = compose_config(["experiment=ban_cifar100"])
    assert cfg.teacher.distill["from"].model.name == cfg.teacher.model.name == cfg.student.model.name == "resnet56"
    assert cfg.method.label == cfg.teacher.distill.method.label == "ban" and cfg.method.temperature == 1.0
