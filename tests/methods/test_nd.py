"""nd (Wang et al. 2023, KD++/DKD++/ReviewKD++): one norm-and-direction term on the embeddings, towards the teacher's
class centres computed by a pass over the training set, added to kd, dkd and reviewkd."""
from __future__ import annotations

import math

import pytest
import torch

from kdbench.distill import create_method
from kdbench.models import count_parameters
from tests.conftest import make_batch, make_pair, method_config
from tests.helpers import assert_no_teacher_grad, close, forward, method_options, rand64
from tests.methods.feature_helpers import one_epoch, teacher_checkpoints  # noqa: F401  (fixture)

SMALL = (3, 16, 16)


def test_nd_loss_is_one_minus_the_projection_on_the_class_direction_over_the_larger_norm():
    from kdbench.methods.nd import nd_loss

    s, t, c = rand64(3, 4, seed=1), rand64(3, 4, seed=2, scale=2.0), rand64(5, 4, seed=3)
    y = torch.tensor([4, 0, 4])
    sn, tn, cn = s.tolist(), t.tolist(), c.tolist()
    total = 0.0
    for n in range(3):
        centre = cn[int(y[n])]
        norm_c = math.sqrt(sum(v * v for v in centre))
        dot = sum(sn[n][k] * centre[k] / norm_c for k in range(4))
        scale = max(math.sqrt(sum(v * v for v in sn[n])), math.sqrt(sum(v * v for v in tn[n])))
        total += 1 - dot / scale
    close(nd_loss(s, t, c, y), total / 3)


def test_emb_trans_maps_a_narrower_student_and_is_absent_at_equal_widths():
    m = create_method(method_options("kd_nd"), make_pair("wrn_40_2", "wrn_40_1", 100, (3, 32, 32)))
    bn, drop, lin = m.emb_trans
    assert (bn.num_features, drop.p, lin.in_features, lin.out_features) == (64, 0.5, 64, 128)
    assert torch.count_nonzero(lin.bias) == 0 and torch.equal(bn.weight, torch.ones(64))
    assert count_parameters(m) == 2 * 64 + 64 * 128 + 128
    assert create_method(method_options("kd_nd"), make_pair("resnet32x4", "resnet8x4", 100, (3, 32, 32))).emb_trans is None


def _pair():
    return make_pair("resnet14", "resnet8", 10, SMALL)


def test_the_centre_stage_averages_the_teachers_embeddings_per_class_and_trains_nothing():
    pair = _pair()
    m = create_method(method_options("kd_nd"), pair)
    (stage,) = m.stages(pair.student, pair.teacher)
    assert (stage.name, stage.epochs, stage.lr, stage.student_taps, stage.teacher_taps) == \
           ("nd_centres", 1, 0.0, (), ("embedding",))
    owned = {id(p) for p in [*pair.student.parameters(), *m.parameters(), *pair.teacher.parameters()]}
    assert not owned & {id(p) for p in stage.parameters}
    m.centre_sum.fill_(7.0)  # stale sums (e.g. an interrupted pass) are dropped when the stage starts
    embs, labels = [], []
    for seed, idx in ((1, range(0, 8)), (2, range(8, 16))):
        batch = make_batch(8, 10, SMALL, indices=idx, seed=seed)
        with torch.no_grad():
            t = pair.teacher.eval().forward_taps(batch.inputs, ("embedding",))
        loss = stage.loss(batch, {}, t)
        assert float(loss.detach()) == 0.0 and loss.requires_grad
        embs.append(t["embedding"])
        labels.append(batch.targets)
    e, y = torch.cat(embs), torch.cat(labels)
    for k in range(10):
        torch.testing.assert_close(m.centres[k], e[y == k].mean(0))
    assert bool(m.centres_fixed)
    # after the pass the centres stay fixed while training
    before = m.centre_sum.clone()
    s, t = forward(pair, m, n=4, shape=SMALL)
    m.loss(make_batch(4, 10, SMALL), s, t, 1)
    assert torch.equal(m.centre_sum, before)


def test_without_the_stage_the_centres_are_running_means_including_the_current_batch():
    from kdbench.methods.nd import nd_loss

    pair = _pair()
    m = create_method(method_options("kd_nd", centres="online"), pair)
    assert m.stages(pair.student, pair.teacher) == []
    batch = make_batch(4, 10, SMALL)
    s, t = forward(pair, m, n=4, shape=SMALL)
    terms = m.all_terms(batch, s, t)
    centres = torch.zeros(10, t["embedding"].shape[1]).index_add(0, batch.targets, t["embedding"].detach())
    close(terms["nd"], float(nd_loss(s["embedding"], t["embedding"], centres, batch.targets).detach()))
    assert m.centre_count.sum() == 4


@pytest.mark.parametrize("name, warmed, offset_zero_parent", [("kd_nd", {"kd"}, None), ("dkd_nd", {"tckd", "nckd"}, "dkd"),
                                                              ("reviewkd_nd", {"reviewkd"}, "reviewkd")])
def test_parent_terms_warm_up_from_a_zero_first_epoch_and_nd_never(name, warmed, offset_zero_parent):
    pair = _pair()
    m = create_method(method_options(name), pair)
    base = {k: float(v) for k, v in method_options(name).weights.items()}
    for epoch, ramp in ((1, 0.0), (2, 0.05), (11, 0.5), (21, 1.0), (240, 1.0)):
        got = m.term_weights(epoch)
        for k, w in base.items():
            assert got[k] == pytest.approx(w * ramp if k in warmed else w), (name, epoch, k)
    if offset_zero_parent:  # warmup_offset 0 reproduces kdbench's own dkd / reviewkd ramp
        m0 = create_method(method_options(name, warmup_offset=0), pair)
        parent = create_method(method_options(offset_zero_parent), pair)
        for epoch in (1, 10, 20):
            assert {k: v for k, v in m0.term_weights(epoch).items() if k in warmed} == \
                   pytest.approx({k: v * m0.weights[k] / parent.weights[k] for k, v in parent.term_weights(epoch).items()
                                  if k in warmed})


@pytest.mark.parametrize("name", ["kd_nd", "dkd_nd", "reviewkd_nd"])
def test_parent_terms_are_the_parents_own(name):
    parent_name = name[:-3]
    pair = _pair()
    m = create_method(method_options(name), pair)
    parent = create_method(method_options(parent_name), make_pair("resnet14", "resnet8", 10, SMALL))
    parent.load_state_dict({k: v for k, v in m.state_dict().items() if k in parent.state_dict()})  # ReviewKD's ABFs
    batch = make_batch(4, 10, SMALL)
    s, t = forward(pair, m, n=4, shape=SMALL)
    terms, parent_terms = m.all_terms(batch, s, t), parent.all_terms(batch, s, t)
    assert set(terms) == set(parent_terms) | {"nd"}
    for k in parent_terms:
        close(terms[k], float(parent_terms[k].detach()))
    assert_no_teacher_grad(sum(v for k, v in terms.items() if k != "ce"), *t.values())


def test_per_pair_weights_are_the_references():
    kd = {("resnet56", "resnet20"): (1.0, 2.0), ("resnet32x4", "resnet8x4"): (3.5, 2.0), ("wrn_40_2", "wrn_40_1"): (1.0, 1.5),
          ("ResNet50", "MobileNetV2"): (3.0, 0.5), ("resnet32x4", "ShuffleV1"): (2.5, 1.5),
          ("resnet32x4", "ShuffleV2"): (4.0, 0.5)}
    dkd = {("resnet56", "resnet20"): (2.5, 4.0, 3.5), ("resnet32x4", "resnet8x4"): (2.0, 8.0, 0.5),
           ("wrn_40_2", "wrn_40_1"): (1.0, 6.0, 1.0), ("ResNet50", "MobileNetV2"): (0.5, 8.0, 1.0),
           ("resnet32x4", "ShuffleV1"): (0.5, 8.0, 4.0), ("resnet32x4", "ShuffleV2"): (0.5, 6.0, 0.5)}
    review = {("resnet56", "resnet20"): (1.2, 1.0), ("resnet32x4", "resnet8x4"): (8.0, 1.0), ("wrn_40_2", "wrn_40_1"): (5.0, 4.0),
              ("ResNet50", "MobileNetV2"): (6.0, 2.0), ("resnet32x4", "ShuffleV1"): (7.0, 1.0),
              ("resnet32x4", "ShuffleV2"): (8.0, 1.5)}
    for name, table, keys in (("kd_nd", kd, ("kd", "nd")), ("dkd_nd", dkd, ("tckd", "nckd", "nd")),
                              ("reviewkd_nd", review, ("reviewkd", "nd"))):
        for (teacher, student), values in table.items():
            w = method_config(name, f"teacher={teacher}", f"student={student}").weights
            assert tuple(float(w[k]) for k in keys) == values and float(w.ce) == 1.0, (name, teacher, student)


def test_kd_nd_job_runs_the_centre_pass_before_training(run_job, teacher_checkpoints, tmp_path):
    record = one_epoch(run_job, teacher_checkpoints, "kd_nd", "resnet14", "resnet8")
    assert record["status"] == "completed" and set(record["history"][0]["train"]) == {"loss", "ce", "kd", "nd"}
    ckpt = torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)
    assert ckpt["stages_done"] == ["nd_centres"]
    assert bool(ckpt["method"]["centres_fixed"]) and float(ckpt["method"]["centre_count"].sum()) == 64  # one pass
    assert record["history"][0]["train"]["loss"] == pytest.approx(
        record["history"][0]["train"]["ce"] + 2.0 * record["history"][0]["train"]["nd"], rel=1e-5)  # kd x 0 in epoch 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kd_nd", "dkd_nd", "reviewkd_nd"])
def test_nd_jobs_run_resnet32x4_to_resnet8x4(run_job, teacher_checkpoints, name):
    record = one_epoch(run_job, teacher_checkpoints, name, "resnet32x4", "resnet8x4")
    assert record["status"] == "completed" and record["extra_params"] == {"reviewkd_nd": 1_808_774}.get(name, 0)


@pytest.mark.slow
def test_kd_nd_job_runs_the_cross_architecture_pair_vgg13_to_mobilenetv2(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "kd_nd", "vgg13", "MobileNetV2")
    assert record["status"] == "completed" and record["extra_params"] == 2 * 1280 + 1280 * 512 + 512


def test_nd_experiment_runs_the_repos_recipe_on_the_stored_benchmark_teachers(tmp_path):
    from tests.conftest import resolve_job

    job = resolve_job(["experiment=nd_cifar100", "pair=resnet32x4-resnet8x4", "method=dkd_nd"], tmp_path)
    assert (job.optim.lr, job.optim.nesterov, job.trainer.batch_size, job.trainer.epochs) == (0.1, True, 128, 240)
    assert job.labels == {"dataset": "cifar100", "teacher": "resnet32x4", "student": "resnet8x4", "method": "dkd_nd"}
    assert (job.method.weights.tckd, job.method.weights.nckd, job.method.weights.nd) == (2.0, 8.0, 0.5)
    teacher = job.teacher.job
    assert (teacher.optim.lr, teacher.optim.nesterov, teacher.trainer.batch_size) == (0.05, False, 64)
    mobile = resolve_job(["experiment=nd_cifar100", "pair=resnet32x4-ShuffleV1", "method=kd_nd"], tmp_path)
    assert mobile.optim.lr == 0.01 and mobile.teacher.job.optim.lr == 0.05
