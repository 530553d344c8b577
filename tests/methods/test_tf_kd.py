"""tf_kd (teacher-free KD: a hand-made virtual teacher), tf_kd_self (self-training: the teacher is a trained copy
of the student's architecture) and ban (born-again networks: tf_kd_self chained over generations)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdbench.distill import create_method, method_class
from kdbench.errors import IncompatibleModels, KDBenchError
from kdbench.models import count_parameters, create_model
from tests.conftest import TINY_SYNTHETIC, compose_config, make_batch, make_pair
from tests.helpers import close, method_options, np_kl, np_softmax, rand64

# ----------------------------------------------------------------------------- tf_kd: the virtual teacher


def test_virtual_teacher_puts_correct_prob_on_the_label_and_spreads_the_rest():
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
    z = rand64(B, K, seed=11, scale=2.0)
    y = torch.tensor([5, 0, 2, 2])
    acc = 0.0
    for i in range(B):
        pd = np.array([a if k == int(y[i]) else (1 - a) / (K - 1) for k in range(K)])
        acc += np_kl(np_softmax(pd / temperature), np_softmax(z[i].numpy()))
    close(tf_kd_reg_loss(z, y, temperature, a), acc / B, tol=1e-5)


def test_tf_kd_reg_loss_equals_reference_code_reduction_mapping():
    """alpha * multiplier * KLDivLoss(mean over B*K) (the authors' code) == (alpha * multiplier / K) * ours."""
    from kdbench.methods.tf_kd import tf_kd_reg_loss, virtual_teacher

    z, y = rand64(3, 100, seed=12, scale=2.0), torch.tensor([4, 50, 99])
    target = torch.softmax(virtual_teacher(y, 100, 0.99).double() / 20, dim=1)
    code = torch.nn.functional.kl_div(torch.log_softmax(z, 1), target, reduction="sum") / z.numel() * 100.0  # nn.KLDivLoss()
    close(tf_kd_reg_loss(z, y, 20.0, 0.99), float(code))


def test_tf_kd_trains_the_student_without_a_teacher_and_tf_kd_self_sends_no_gradient_to_its_teacher():
    pair = make_pair("resnet8", "resnet8")
    batch = make_batch(6, 10)
    batch.targets = batch.indices * 3 % 10  # targets 0, 3, 6, 9, 2, 5
    reg = create_method(method_options("tf_kd"), pair)
    assert method_class("tf_kd").needs_teacher is False and count_parameters(reg) == 0
    s_out = pair.student.forward_taps(batch.inputs, reg.student_taps)
    terms = reg.all_terms(batch, s_out, None)
    assert set(terms) == {"ce", "tf_kd"} and all(torch.isfinite(v) for v in terms.values())
    terms["tf_kd"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pair.student.parameters())

    self_kd = create_method(method_options("tf_kd_self"), pair)
    assert method_class("tf_kd_self").needs_teacher is True and self_kd.teacher_taps == ("logits",)
    pair.teacher.requires_grad_(True)
    pair.teacher.zero_grad(set_to_none=True)
    t_out = pair.teacher.forward_taps(batch.inputs, self_kd.teacher_taps)  # with grad, to catch any leak
    s_out = pair.student.forward_taps(batch.inputs, self_kd.student_taps)
    terms = self_kd.all_terms(batch, s_out, t_out)
    assert set(terms) == {"ce", "kd"}
    terms["kd"].backward()
    assert all(p.grad is None for p in pair.teacher.parameters())
    pair.teacher.requires_grad_(False)
    z_s, z_t, T = s_out["logits"].detach().double().numpy(), t_out["logits"].detach().double().numpy(), 6.0
    expected = T**2 * sum(np_kl(np_softmax(z_t[i] / T), np_softmax(z_s[i] / T)) for i in range(6)) / 6
    close(terms["kd"], expected, tol=1e-4)


def test_tf_kd_self_requires_the_students_architecture():
    with pytest.raises(IncompatibleModels, match="own architecture"):
        create_method(method_options("tf_kd_self"), make_pair("resnet14", "resnet8"))
    create_method(method_options("tf_kd_self", require_same_architecture=False), make_pair("resnet14", "resnet8"))
    same = make_pair("resnet8", "resnet8")
    same.teacher.requires_grad_(False)  # the trainer freezes the teacher; the check must count all its parameters
    create_method(method_options("tf_kd_self"), same)


def test_tf_kd_rejects_bad_options():
    pair = make_pair(None, "resnet8")
    with pytest.raises(KDBenchError, match="correct_prob"):
        create_method(method_options("tf_kd", correct_prob=1.5), pair)
    with pytest.raises(KDBenchError, match="temperature"):
        create_method(method_options("tf_kd", temperature=0.0), pair)


@pytest.mark.slow
def test_tf_kd_job_trains_without_a_teacher(run_job):
    record = run_job(*TINY_SYNTHETIC, "student=resnet8x4", "method=tf_kd")
    assert record["status"] == "completed" and record["teacher"] is None and record["extra_params"] == 0
    assert set(record["history"][0]["train"]) == {"loss", "ce", "tf_kd"}


@pytest.mark.slow
def test_tf_kd_self_job_distills_from_a_checkpoint_of_the_same_architecture(run_job, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "resnet8x4.pt"
    torch.save({"model": create_model("resnet8x4", num_classes=10, input_shape=(3, 32, 32)).state_dict()}, ckpt)
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet8x4", "student=resnet8x4", "method=tf_kd_self",
                     f"teacher.checkpoint={ckpt}")
    assert record["status"] == "completed" and record["teacher"] == "resnet8x4"
    assert set(record["history"][0]["train"]) == {"loss", "ce", "kd"}


# ----------------------------------------------------------------------------- ban: born-again generations


def test_ban_generations_chain_on_digits(run_job):
    chain = ["teacher=mlp_32", "+teacher@teacher.distill.from=mlp_32", "+method@teacher.distill.method=ban",
             "method=ban", "trainer.epochs=2", "trainer.progress=false"]
    rec = run_job(*chain)
    assert rec["status"] == "completed" and rec["method"] == "ban"
    assert rec["teacher_source"]["distilled_from"] == "mlp_32" and rec["teacher_source"]["distill_method"] == "ban"


def test_ban_experiment_composes():
    cfg = compose_config(["experiment=ban_cifar100"])
    assert cfg.teacher.distill["from"].model.name == cfg.teacher.model.name == cfg.student.model.name == "resnet56"
    assert cfg.method.label == cfg.teacher.distill.method.label == "ban" and cfg.method.temperature == 1.0
