"""netgraft (Shen et al. AAAI 2021): thin student blocks grafted one by one into the teacher (wrapped in 1x1
adapters), then progressively joined, on a few unlabeled samples per class, with a normalised-logit MSE."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdbench.distill import create_method
from kdbench.errors import IncompatibleModels
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_pair
from tests.helpers import close, method_options, rand64
from tests.methods.feature_helpers import teacher_checkpoints  # noqa: F401  (fixture)

SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def graft_pair():
    return make_pair("vgg16", "vgg16_graft", 10, SHAPE, epochs=1700)


def test_the_graft_loss_sums_squared_differences_of_l2_normalised_logits():
    from kdbench.methods.netgraft import normalized_logit_mse

    zs, zt = rand64(2, 3, seed=1), rand64(2, 3, seed=2)
    a = zs.numpy() / np.linalg.norm(zs.numpy(), axis=1, keepdims=True)
    b = zt.numpy() / np.linalg.norm(zt.numpy(), axis=1, keepdims=True)
    close(normalized_logit_mse(zs, zt), float(((a - b) ** 2).sum()))


def test_phases_follow_the_codes_epochs_and_scale_to_the_run():
    from kdbench.methods.netgraft import phase_bounds

    assert phase_bounds([1000, 200, 200, 150, 150], 1700) == [1000, 1200, 1400, 1550, 1700]
    assert phase_bounds([1000, 200, 200, 150, 150], 17) == [10, 12, 14, 16, 17]
    assert phase_bounds([1000, 200, 200, 150, 150], 5) == [1, 2, 3, 4, 5]  # every phase keeps an epoch


def test_the_student_copies_the_teachers_first_blocks_and_grafts_blocks_3_4_and_the_classifier(graft_pair):
    m = create_method(method_options("netgraft"), graft_pair)
    t, s = graft_pair.teacher, graft_pair.student
    for i in range(3):
        for a, b in zip(t.__getattr__(f"block{i}").state_dict().values(), s.__getattr__(f"block{i}").state_dict().values()):
            assert torch.equal(a, b)
    assert m.units == [3, 4, "head"]
    assert [(a.in_channels, a.out_channels) for a in m.s2t] == [(256, 512), (256, 512)]
    assert [(a.in_channels, a.out_channels) for a in m.t2s] == [(512, 256), (512, 256)]
    assert count_parameters(m) == 2 * (256 * 512 + 512) + 2 * (512 * 256 + 256)
    assert list(m.trainable_parameters()) == []


def test_grafting_nothing_is_the_teacher_and_a_block_graft_wraps_the_unit_in_its_adapters(graft_pair):
    from kdbench.methods.netgraft import vgg_block, vgg_head

    m = create_method(method_options("netgraft"), graft_pair)
    t, s = graft_pair.teacher.eval(), graft_pair.student.eval()
    m.eval()
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(m.grafted_logits(x, 0, -1), t(x))
        h = x
        for i in range(4):
            h = vgg_block(t, i, h, 16)
        h = m.s2t[1](vgg_block(s, 4, m.t2s[0](h), 16))  # unit 1 = block 4: t2s before, s2t after
        close(float((m.grafted_logits(x, 1, 1) - vgg_head(t, h)).abs().max()), 0.0, tol=1e-5)
        h = x
        for i in range(3):
            h = vgg_block(s, i, h, 16)
        h = m.t2s[0](m.s2t[0](vgg_block(s, 3, h, 16)))
        h = m.t2s[1](m.s2t[1](vgg_block(s, 4, h, 16)))
        close(float((m.eval_logits(s, x) - vgg_head(s, h)).abs().max()), 0.0, tol=1e-5)


def test_each_phase_has_its_own_adam_over_its_scion(graft_pair):
    m = create_method(method_options("netgraft"), graft_pair)
    assert [m.phase_at(e) for e in (1, 1000, 1001, 1401, 1700)] == [("block", 0), ("block", 0), ("block", 1),
                                                                     ("net", 1), ("net", 2)]
    opt = m.optimizer_for(("block", 1))
    assert isinstance(opt, torch.optim.Adam)
    groups = opt.param_groups
    assert groups[0]["lr"] == 0.001 and groups[1]["lr"] == 0.001
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in graft_pair.student.block4.parameters()}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in (*m.t2s[0].parameters(), *m.s2t[1].parameters())}
    first = m.optimizer_for(("block", 0)).param_groups[0]
    assert first["lr"] == 0.00025
    net = m.optimizer_for(("net", 2)).param_groups
    assert len(net) == 1 and net[0]["lr"] == 1e-4


def test_the_learning_rates_scale_with_the_shots(graft_pair):
    m = create_method(method_options("netgraft", shots=5), graft_pair)
    assert m.lrs_student == [0.000125, 0.0005, 0.0005] and m.lr_adapter == 0.0005 and m.lr_net == 1e-4


@pytest.mark.parametrize("teacher,student,needle", [("resnet14", "resnet8", "VGG"), ("vgg16", "vgg8", "block0")])
def test_netgraft_refuses_non_vgg_pairs_and_students_whose_copied_blocks_differ(teacher, student, needle):
    with pytest.raises(IncompatibleModels, match=needle):
        create_method(method_options("netgraft"), make_pair(teacher, student, 10, SHAPE))


def test_a_few_shot_job_trains_the_grafted_student_without_labels(run_job, teacher_checkpoints):
    record = run_job(*TINY_SYNTHETIC, "dataset.image_shape=[3,16,16]", "dataset.samples_per_class=2",
                     "teacher=vgg16", "student=vgg16_graft", "method=netgraft", "trainer.epochs=5",
                     f"teacher.checkpoint={teacher_checkpoints('vgg16')}")
    assert record["status"] == "completed" and record["labels_used"] is False
    assert record["netgraft_phase_end_epochs"] == [1, 2, 3, 4, 5] and record["dataset"] == "synthetic-2shot"
    assert all(set(h["train"]) == {"loss", "graft"} for h in record["history"])


@pytest.mark.slow
def test_netgraft_job_runs_the_codes_pair_at_32_pixels(run_job, teacher_checkpoints):
    record = run_job(*TINY_SYNTHETIC, "teacher=vgg16", "student=vgg16_graft", "method=netgraft", "trainer.epochs=5",
                     f"teacher.checkpoint={teacher_checkpoints('vgg16')}")
    assert record["status"] == "completed"


def test_gradients_pass_through_the_frozen_teacher_blocks_to_the_grafted_unit_but_never_into_the_teacher():
    """The job freezes the teacher (requires_grad False, eval mode): the graft loss moves only the student unit and
    its adapters, and no optimizer of the method holds a teacher parameter."""
    from kdbench.methods.netgraft import normalized_logit_mse

    pair = make_pair("vgg16", "vgg16_graft", 10, SHAPE, epochs=5)
    pair.teacher.eval().requires_grad_(False)
    m = create_method(method_options("netgraft"), pair)
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        z_t = pair.teacher(x)
    normalized_logit_mse(m.grafted_logits(x, 0, 0), z_t).backward()
    assert all(p.grad is None for p in pair.teacher.parameters())
    assert pair.student.block3[0].weight.grad is not None and m.s2t[0].weight.grad is not None
    teacher_ids = {id(p) for p in pair.teacher.parameters()}
    for phase in m.phases:
        params = {id(p) for g in m.optimizer_for(phase).param_groups for p in g["params"]}
        assert not params & teacher_ids
