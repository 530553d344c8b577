"""kd (Hinton et al.): T^2-scaled KL to the teacher's softened posteriors; and TAKD, where the teacher is itself
trained by distillation (a teacher assistant)."""
from __future__ import annotations

import json
import math

import numpy as np
import torch
from omegaconf import open_dict

from kdbench.methods.kd import kd_loss
from tests.conftest import resolve_job, TINY_SYNTHETIC, compose_config


def _kd_by_hand(zs, zt, T):
    total = 0.0
    for s_row, t_row in zip(zs, zt):
        ps = np.exp(s_row / T) / np.exp(s_row / T).sum()
        pt = np.exp(t_row / T) / np.exp(t_row / T).sum()
        total += sum(p * math.log(p / q) for p, q in zip(pt, ps))
    return T * T * total / len(zs)


def test_kd_loss_matches_hand_computation():
    zs = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    zt = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    got = kd_loss(torch.tensor(zs), torch.tensor(zt), temperature=4.0).item()
    assert abs(got - _kd_by_hand(zs, zt, 4.0)) < 1e-10


def test_kd_loss_matches_the_two_class_closed_form():
    # p_t = (1/2, 1/2), p_s = softmax([ln 3, 0]) = (3/4, 1/4) at T=1: KL = 0.5 ln(2/3) + 0.5 ln(2)
    got = kd_loss(torch.tensor([[math.log(3.0), 0.0]]), torch.zeros(1, 2), temperature=1.0).item()
    assert abs(got - (0.5 * math.log(2 / 3) + 0.5 * math.log(2))) < 1e-7


def test_kd_loss_is_zero_for_equal_logits_and_teacher_gets_no_gradient():
    zs = torch.randn(4, 5, requires_grad=True)
    zt = zs.detach().clone().requires_grad_(True)
    loss = kd_loss(zs, zt, 4.0)
    assert abs(loss.item()) < 1e-6
    (loss + kd_loss(zs, zt * 2, 4.0)).backward()
    assert zt.grad is None and zs.grad is not None


def test_kd_job_trains_resnet8x4_from_a_stored_resnet32x4_teacher_on_synthetic_data(run_job):
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet32x4", "student=resnet8x4", "method=kd")
    assert record["status"] == "completed"
    assert record["teacher"] == "resnet32x4" and record["student"] == "resnet8x4"
    assert record["teacher_source"]["kind"] == "store"
    assert len(record["history"]) == 1 and 0 <= record["last_top1"] <= 100
    assert set(record["history"][0]["train"]) == {"loss", "ce", "kd"}


# ----------------------------------------------------------------------------- TAKD: teachers trained by distillation

TAKD_CHAIN = ["teacher=mlp_800x2", "+teacher@teacher.distill.from=mlp_1200x2", "+method@teacher.distill.method=kd"]


def test_takd_assistant_job_is_a_kd_run_and_its_store_key_covers_method_and_big_teacher():
    job = resolve_job([*TAKD_CHAIN, "student=mlp_32"])
    ta = job.teacher.job
    assert ta.student.label == "mlp_800x2" and ta.labels["teacher"] == "mlp_1200x2"
    assert ta.method.name == "kd" and ta.config["teacher"]["distill"] is None
    big = ta.teacher.job
    assert big.method.name == "vanilla" and big.student.label == "mlp_1200x2"
    # the big teacher is the same store entry a plain `teacher=mlp_1200x2` run uses
    assert ta.teacher.entry == resolve_job(["teacher=mlp_1200x2", "student=mlp_32"]).teacher.entry
    # the TA's key covers the distillation method and the big teacher
    other_method = resolve_job([*TAKD_CHAIN[:2], "+method@teacher.distill.method=logit_l2"])
    other_teacher = resolve_job([TAKD_CHAIN[0], "+teacher@teacher.distill.from=mlp_800x2", TAKD_CHAIN[2]])
    keys = {job.teacher.entry, other_method.teacher.entry, other_teacher.teacher.entry,
            resolve_job(["teacher=mlp_800x2"]).teacher.entry}
    assert len(keys) == 4
    # a TA's recipe overrides apply to the TA's job, not to how the big teacher is trained
    changed = resolve_job([*TAKD_CHAIN, "+teacher.recipe.optim.lr=0.5"]).teacher.job
    assert changed.optim.lr == 0.5 and changed.teacher.job.optim.lr == job.optim.lr


def test_takd_experiment_composes():
    cfg = compose_config(["experiment=takd_cifar100", "pair=plain_cnn_10_c100-plain_cnn_4_c100-plain_cnn_2_c100"])
    assert cfg.teacher.model.name == "plain_cnn_4_c100" and cfg.teacher.distill["from"].model.name == "plain_cnn_10_c100"
    assert cfg.teacher.distill.method.name == "kd" and cfg.student.model.name == "plain_cnn_2_c100"
    assert cfg.dataset.name == "cifar100" and cfg.method.name == "kd"


def test_takd_chain_on_digits_stores_both_teachers_and_reuses_them(tmp_path):
    from kdbench.job import run

    overrides = [*TAKD_CHAIN, "student=mlp_32", "method=kd", "trainer.epochs=1", "trainer.progress=false",
                 "++teacher.recipe.trainer.epochs=1", "++teacher.distill.from.recipe.trainer.epochs=1"]
    record = run(resolve_job(overrides, tmp_path), tmp_path / "job")
    assert record["status"] == "completed" and record["teacher"] == "mlp_800x2"
    source = record["teacher_source"]
    assert source["distilled_from"] == "mlp_1200x2" and source["distill_method"] == "kd"
    store = tmp_path / "teachers"
    entries = sorted(p.name.rsplit("-", 1)[0] for p in store.iterdir())
    assert entries == ["mlp_1200x2", "mlp_800x2"]

    ta_meta = json.loads((store / f"mlp_800x2-{source['key']}" / "meta.json").read_text())
    assert ta_meta["config"]["teacher"]["label"] == "mlp_1200x2" and ta_meta["config"]["method"]["name"] == "kd"
    ta_record = json.loads((store / f"mlp_800x2-{source['key']}" / "train" / "metrics.json").read_text())
    assert ta_record["teacher_source"]["kind"] == "store" and ta_record["method"] == "kd"
    # a second job with the same chain reuses both stored teachers
    again = run(resolve_job(overrides, tmp_path), tmp_path / "job2")
    assert again["teacher_source"]["key"] == source["key"] and len(list(store.iterdir())) == 2
