"""tofd (Zhang et al. NeurIPS 2020): task-oriented auxiliary classifiers on both nets, L2 between linked features,
soft cross-entropy at a growing temperature, and an orthogonality penalty on the links."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.distill import create_method
from kdbench.errors import IncompatibleModels
from kdbench.models import count_parameters
from tests.conftest import make_batch, make_pair
from tests.helpers import assert_no_teacher_grad, close, forward, method_options, np_softmax, rand64
from tests.methods.feature_helpers import one_epoch, teacher_checkpoints  # noqa: F401  (fixture)


def test_soft_cross_entropy_is_minus_the_mean_over_samples_of_teacher_probabilities_times_student_log_probabilities():
    from kdbench.methods.tofd import soft_cross_entropy

    zs, zt = rand64(3, 4, seed=1), rand64(3, 4, seed=2)
    T = 1.5
    want = 0.0
    for n in range(3):
        p = np_softmax(zt[n].numpy() / T)
        q = np_softmax(zs[n].numpy() / T)
        want -= sum(p[c] * math.log(q[c]) for c in range(4))
    close(soft_cross_entropy(zs, zt, T), want / 3)


def test_feature_loss_is_the_unsquared_frobenius_distance_summed_over_levels():
    from kdbench.methods.tofd import tofd_feature_loss

    a, b, c, d = rand64(2, 3, seed=3), rand64(2, 3, seed=4), rand64(2, 5, seed=5), rand64(2, 5, seed=6)
    want = math.sqrt(((a - b) ** 2).sum().item()) + math.sqrt(((c - d) ** 2).sum().item())
    close(tofd_feature_loss([a, c], [b, d]), want)


def test_orthogonal_loss_measures_both_gram_matrices_against_the_identity():
    from kdbench.methods.tofd import orthogonal_loss

    w = rand64(2, 3, seed=7)
    wwt = [[sum(w[i, k].item() * w[j, k].item() for k in range(3)) - (i == j) for j in range(2)] for i in range(2)]
    wtw = [[sum(w[k, i].item() * w[k, j].item() for k in range(2)) - (i == j) for j in range(3)] for i in range(3)]
    want = math.sqrt(sum(v * v for r in wwt for v in r)) + math.sqrt(sum(v * v for r in wtw for v in r))
    close(orthogonal_loss([w]), want)
    close(orthogonal_loss([torch.eye(3, dtype=torch.float64)]), 0.0)


def test_the_temperature_grows_linearly_from_one_by_three_over_250_epochs():
    from kdbench.methods.tofd import tofd_temperature

    assert tofd_temperature(1) == pytest.approx(1 + 3 / 250)  # the code's 1 + (3 / 250) * (1 + epoch_0)
    assert tofd_temperature(250) == pytest.approx(4.0)


def test_auxiliary_classifiers_chain_sepconvs_to_the_last_stage_and_links_map_student_to_teacher_widths(benchmark_pair):
    m = create_method(method_options("tofd"), benchmark_pair)
    assert m.s_aux_taps == ("stage1", "stage2") and m.t_aux_taps == ("stage1", "stage2")
    head = m.student_heads[0]  # stage1 (64, 32x32) -> 128 (16x16) -> 256 (8x8), pooled, Linear(256 -> 100)
    assert [b.op[5].out_channels for b in head.body] == [128, 256] and [b.op[0].stride for b in head.body] == [(2, 2)] * 2
    assert head.fc.in_features == 256 and len(m.student_heads[1].body) == 1
    assert [(l.in_features, l.out_features) for l in m.links] == [(256, 256)] * 3
    frozen = {id(p) for p in m.teacher_head.parameters()}
    trained = list(m.trainable_parameters())
    assert frozen and not frozen & {id(p) for p in trained}
    assert sum(p.numel() for p in trained) + sum(p.numel() for p in m.teacher_head.parameters()) == count_parameters(m)


def test_terms_read_the_aux_heads_at_the_epochs_temperature_and_no_gradient_reaches_the_teacher():
    from kdbench.methods.tofd import soft_cross_entropy

    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    m = create_method(method_options("tofd"), pair)
    s, t = forward(pair, m, n=4, shape=(3, 16, 16))
    batch = make_batch(4, 10)
    _, terms = m.loss(batch, s, t, 125)
    m.teacher_head.eval()
    z_s = [h(s[k])[1] for h, k in zip(m.student_heads, ("stage1", "stage2"))] + [s["logits"]]
    with torch.no_grad():
        z_t = [h(t[k])[1] for h, k in zip(m.teacher_head, ("stage1", "stage2"))] + [t["logits"]]
    close(terms["tofd_kd"], float(sum(soft_cross_entropy(a, b, 2.5) for a, b in zip(z_s, z_t)).detach()), tol=1e-5)
    close(terms["aux_ce"], float(sum(F.cross_entropy(z, batch.targets) for z in z_s[:2]).detach()), tol=1e-5)
    assert_no_teacher_grad(sum(terms.values()), *t.values())
    assert all(p.grad is None for p in m.teacher_head.parameters())


def test_the_stage_trains_the_teacher_heads_alone_without_a_student_forward():
    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    m = create_method(method_options("tofd"), pair)
    (stage,) = m.stages(pair.student, pair.teacher)
    assert stage.name == "teacher_aux" and not stage.uses_student and stage.teacher_taps == ("stage1", "stage2")
    assert {id(p) for p in stage.parameters} == {id(p) for p in m.teacher_head.parameters()}
    assert create_method(method_options("tofd", stage_epochs=0), pair).stages(pair.student, pair.teacher) == []


def test_tofd_refuses_an_mlp_pair():
    with pytest.raises(IncompatibleModels, match="'tofd'"):
        create_method(method_options("tofd"), make_pair("mlp_1200x2", "mlp_32", 10, (1, 8, 8)))


@pytest.mark.slow
def test_tofd_job_runs_resnet32x4_to_resnet8x4_with_its_teacher_head_stage(run_job, teacher_checkpoints, tmp_path):
    record = one_epoch(run_job, teacher_checkpoints, "tofd", "resnet32x4", "resnet8x4", "method.stage_epochs=1")
    assert record["status"] == "completed"
    assert set(record["history"][0]["train"]) == {"loss", "ce", "aux_ce", "tofd_kd", "tofd_feat", "orth"}
    assert torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)["stages_done"] == ["teacher_aux"]


@pytest.mark.slow
def test_tofd_job_runs_the_cross_architecture_pair_vgg13_to_mobilenetv2(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "tofd", "vgg13", "MobileNetV2", "method.stage_epochs=1")
    assert record["status"] == "completed"
