"""mhgd (Lee & Song, BMVC 2019): multi-head attention graphs over the leading singular vectors of consecutive stage
maps, the attention trained on the teacher first, a (reverse) KL between the tanh'd graphs, the distillation gradient
clipped to the CE gradient's norm."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.distill import create_method
from kdbench.errors import IncompatibleModels
from tests.conftest import make_batch, make_pair
from tests.helpers import assert_no_teacher_grad, close, forward, method_options, rand64
from tests.methods.feature_helpers import one_epoch, teacher_checkpoints  # noqa: F401  (fixture)


def test_leading_right_singular_vectors_match_numpy_up_to_sign():
    from kdbench.methods.mhgd import leading_right_singular_vectors

    f = rand64(2, 3, 2, 2, seed=1)  # each sample: a (4, 3) matrix of positions x channels
    got = leading_right_singular_vectors(f, 2)
    for n in range(2):
        mat = f[n].reshape(3, 4).T.numpy()
        _, _, vt = np.linalg.svd(mat, full_matrices=False)
        for k in range(2):
            ref = vt[k] / np.linalg.norm(vt[k])
            v = got[n, :, k].numpy()
            assert min(np.abs(v - ref).max(), np.abs(v + ref).max()) < 1e-5


def test_the_student_keeps_its_vector_of_largest_absolute_cosine_to_the_teacher_with_that_cosines_sign():
    from kdbench.methods.mhgd import align_to_teacher

    v_s = torch.tensor([[[1.0, 0.0], [0.0, -1.0]]], dtype=torch.float64)  # columns (1, 0) and (0, -1)
    v_t = torch.tensor([[[0.2], [0.9]]], dtype=torch.float64)  # closest to column 2, with a negative cosine
    close(align_to_teacher(v_s, v_t)[0, 0], 0.0)
    close(align_to_teacher(v_s, v_t)[0, 1], 1.0)


def test_each_head_of_the_graph_is_sender_times_receiver_with_the_head_as_the_fastest_index():
    from kdbench.methods.mhgd import AttentionHead

    torch.manual_seed(0)
    att = AttentionHead(3, 2, dim=2, heads=2).double().eval()
    key, query = rand64(4, 3, seed=2), rand64(4, 2, seed=3)
    g = att(key, query)
    s, r = att.sender(key), att.receiver(query)  # (4, dim * heads), element d * heads + h
    for h in range(2):
        for i in range(4):
            for j in range(4):
                want = sum(s[i, d * 2 + h].item() * r[j, d * 2 + h].item() for d in range(2))
                close(g[h, i, j], want)


def test_graph_kl_sums_the_row_kls_of_every_head_with_the_first_graph_as_the_distribution():
    from kdbench.methods.mhgd import graph_kl

    a, b = rand64(2, 3, 3, seed=4), rand64(2, 3, 3, seed=5)
    want = 0.0
    for h in range(2):
        for i in range(3):
            p = np.exp(a[h, i].numpy()) / np.exp(a[h, i].numpy()).sum()
            q = np.exp(b[h, i].numpy()) / np.exp(b[h, i].numpy()).sum()
            want += float((p * (np.log(p) - np.log(q))).sum())
    close(graph_kl(a, b), want)


def test_mhgd_loss_compares_tanh_graphs_student_first_by_default():
    from kdbench.methods.mhgd import graph_kl, mhgd_loss

    gs, gt = rand64(2, 3, 3, seed=6), rand64(2, 3, 3, seed=7)
    close(mhgd_loss([gs], [gt]), float(graph_kl(torch.tanh(gs), torch.tanh(gt))))
    close(mhgd_loss([gs], [gt], reverse=False), float(graph_kl(torch.tanh(gt), torch.tanh(gs))))


def test_the_distillation_gradient_is_clipped_to_the_ce_gradient_norm_times_the_ramp():
    from kdbench.methods.mhgd import ce_ramp, clipped_sum

    g_task = torch.tensor([3.0, 4.0])  # norm 5
    g_big = torch.tensor([0.0, 20.0])
    close(clipped_sum(g_task, g_big, 0.5)[1], 4.0 + 2.5)  # clipped to norm 2.5
    close(clipped_sum(g_task, torch.tensor([1.0, 0.0]), 1.0)[0], 4.0)  # within the limit: unchanged
    assert clipped_sum(None, g_big, 1.0).abs().sum() == 0  # no CE gradient: nothing of the distillation passes
    assert ce_ramp(1) == 0.5 and ce_ramp(6) == pytest.approx(1 / (1 + math.exp(-5)))


def test_the_mha_stage_trains_the_attention_and_estimators_on_the_teacher_alone(benchmark_pair):
    m = create_method(method_options("mhgd"), benchmark_pair)
    (stage,) = m.stages(benchmark_pair.student, benchmark_pair.teacher)
    assert (stage.name, stage.epochs, stage.uses_student) == ("mha", 40, False)
    assert {id(p) for p in stage.parameters} == {id(p) for p in (*m.attention.parameters(), *m.estimators.parameters())}
    assert list(m.trainable_parameters()) == []
    s, t = forward(benchmark_pair, m, n=4)
    assert torch.isfinite(stage.loss(make_batch(4, 100, (3, 32, 32)), None, t))


def test_no_gradient_reaches_the_teacher_and_the_student_gets_one():
    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    m = create_method(method_options("mhgd"), pair)
    s, t = forward(pair, m, n=6, shape=(3, 16, 16))
    loss = m.all_terms(make_batch(6, 10), s, t)["mhgd"]
    assert_no_teacher_grad(loss, *t.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pair.student.parameters())


def test_mhgd_refuses_stages_of_other_widths():
    with pytest.raises(IncompatibleModels, match="channels"):
        create_method(method_options("mhgd"), make_pair("wrn_40_2", "wrn_40_1"))


@pytest.mark.slow
def test_mhgd_job_runs_resnet32x4_to_resnet8x4_with_its_mha_stage_and_the_clipped_step(run_job, teacher_checkpoints,
                                                                                      tmp_path):
    record = one_epoch(run_job, teacher_checkpoints, "mhgd", "resnet32x4", "resnet8x4", "method.stage_epochs=1")
    assert record["status"] == "completed" and record["clip_to_ce"] is True
    assert torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)["stages_done"] == ["mha"]


@pytest.mark.slow
def test_mhgd_job_runs_the_equal_width_cross_family_pair_resnet56_to_wrn_16_1(run_job, teacher_checkpoints):
    """vgg13 -> MobileNetV2 is refused (widths); a ResNet teacher and a WRN student of equal widths train."""
    record = one_epoch(run_job, teacher_checkpoints, "mhgd", "resnet56", "wrn_16_1", "method.stage_epochs=1")
    assert record["status"] == "completed"
