"""mgd (Yue et al. ECCV 2020, kaiyuyue/mgd MGDistiller, amp reducer): teacher channels matched to student channels by a
linear assignment on tracked cosine costs, reduced by absolute max pooling, partial L2 with OFD's margins."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from kdbench.distill import create_method
from kdbench.errors import IncompatibleModels
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair
from tests.helpers import assert_no_teacher_grad, close, forward, method_options, rand64
from tests.methods.feature_helpers import one_epoch, teacher_checkpoints  # noqa: F401  (fixture)


def test_channel_cost_sums_two_minus_twice_the_cosine_of_flattened_channel_maps():
    from kdbench.methods.mgd import channel_cost

    s, t = rand64(2, 2, 2, 2, seed=1), rand64(2, 3, 2, 2, seed=2)
    got = channel_cost(s, t)
    for i in range(2):
        for j in range(3):
            want = 0.0
            for n in range(2):
                a, b = s[n, i].flatten().tolist(), t[n, j].flatten().tolist()
                cos = sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
                want += 2 - 2 * cos
            close(got[i, j], want)


def test_the_flow_is_the_cheapest_assignment_of_the_tiled_cost_by_brute_force():
    from kdbench.methods.mgd import solve_flow

    cost = rand64(2, 4, seed=3).abs()
    flow = solve_flow(cost)
    tiled = [[cost[r % 2, c].item() for c in range(4)] for r in range(4)]  # row g * C_s + i = student channel i
    best = min(itertools.permutations(range(4)), key=lambda p: sum(tiled[r][p[r]] for r in range(4)))
    assert sum(tiled[r][int(flow[r])] for r in range(4)) == pytest.approx(sum(tiled[r][best[r]] for r in range(4)))
    assert sorted(flow.tolist()) == [0, 1, 2, 3]


def test_shaving_uses_only_the_first_groups_times_student_channels_of_the_teacher():
    from kdbench.methods.mgd import solve_flow

    flow = solve_flow(rand64(2, 5, seed=4).abs())  # 5 teacher channels, 2 groups of 2: channel 4 is shaved
    assert len(flow) == 4 and set(flow.tolist()) == {0, 1, 2, 3}


def test_amp_picks_the_grouped_value_of_largest_magnitude_and_averages_the_margins():
    from kdbench.methods.mgd import amp_reduce

    t = rand64(1, 4, 1, 2, seed=5)
    margin = torch.tensor([-1.0, -2.0, -3.0, -4.0], dtype=torch.float64)
    flow = torch.tensor([3, 0, 1, 2])  # student channel 0: teacher 3 and 1; channel 1: teacher 0 and 2
    red, m = amp_reduce(t, margin, flow, 2)
    for i, group in enumerate(([3, 1], [0, 2])):
        for w in range(2):
            vals = [t[0, c, 0, w].item() for c in group]
            close(red[0, i, 0, w], max(vals, key=abs))
        close(m[0, i, 0, 0], sum(margin[c].item() for c in group) / 2)


def test_level_loss_sums_the_squares_where_the_student_exceeds_the_clamped_target_or_the_target_is_positive():
    from kdbench.methods.mgd import mgd_level_loss

    s = torch.tensor([[[[0.5]], [[-2.0]], [[1.0]], [[-0.5]]]], dtype=torch.float64)
    t = torch.tensor([[[[-3.0]], [[-3.0]], [[2.0]], [[-0.1]]]], dtype=torch.float64)
    m = torch.full((1, 4, 1, 1), -1.0, dtype=torch.float64)
    # targets max(t, m) = -1, -1, 2, -0.1; counted: 0.5 > -1 yes, -2 > -1 no, target 2 > 0 yes, -0.5 > -0.1 no
    close(mgd_level_loss(s, t, m), (0.5 + 1) ** 2 + (1.0 - 2.0) ** 2)


def test_deeper_levels_weigh_more_and_the_sum_is_divided_by_the_batch():
    from kdbench.methods.mgd import mgd_level_loss, mgd_loss

    s = [rand64(2, 2, 2, 2, seed=6), rand64(2, 2, 1, 1, seed=7)]
    t = [rand64(2, 2, 2, 2, seed=8), rand64(2, 2, 1, 1, seed=9)]
    m = [torch.full((2,), -0.5, dtype=torch.float64)] * 2
    flows = [torch.arange(2), torch.arange(2)]
    want = (float(mgd_level_loss(s[0], t[0], m[0].view(1, 2, 1, 1))) / 2
            + float(mgd_level_loss(s[1], t[1], m[1].view(1, 2, 1, 1)))) / 2
    close(mgd_loss(s, t, m, flows), want)


def test_one_batchnorm_per_student_level_is_the_only_extra_parameter(benchmark_pair):
    m = create_method(method_options("mgd"), benchmark_pair)
    assert count_parameters(m) == 2 * (64 + 128 + 256) == 896
    s, t = forward(benchmark_pair, m, n=2)
    loss = m.all_terms(make_batch(2, 100, (3, 32, 32)), s, t)["mgd"]
    assert_no_teacher_grad(loss, *t.values())


def test_the_flow_is_due_before_epoch_one_and_after_every_update_freq_epochs():
    m = create_method(method_options("mgd", update_freq=2), make_pair("resnet14", "resnet8"))
    assert [m.flow_due(e) for e in (1, 2, 3, 4, 5)] == [0, 0, 2, 2, 4]


@pytest.mark.parametrize("teacher,student,needle", [("resnet14", "resnet8x4", "reduces teacher channels"),
                                                    ("vgg13", "MobileNetV2", "lacks tap")])
def test_mgd_refuses_students_wider_than_their_teacher_or_without_pre_activation_maps(teacher, student, needle):
    with pytest.raises(IncompatibleModels, match=needle):
        create_method(method_options("mgd"), make_pair(teacher, student))


def test_a_job_solves_the_flow_from_a_tracking_pass_and_keeps_it_in_the_checkpoint(run_job, teacher_checkpoints,
                                                                                    tmp_path):
    record = run_job(*TINY_SYNTHETIC, "dataset.image_shape=[3,16,16]", "teacher=resnet14", "student=resnet8",
                     "method=mgd", f"teacher.checkpoint={teacher_checkpoints('resnet14')}", "trainer.epochs=2")
    assert record["status"] == "completed" and record["flow_update_freq"] == 1
    state = torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)["method"]
    assert int(state["flow_epoch"]) == 1  # solved before epoch 1, again after epoch 1
    assert sorted(state["flow1"].tolist()) == list(range(16))


@pytest.mark.slow
def test_mgd_job_runs_resnet32x4_to_resnet8x4(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "mgd", "resnet32x4", "resnet8x4")
    assert record["status"] == "completed" and record["extra_params"] == 896


@pytest.mark.slow
def test_mgd_job_runs_the_cross_architecture_pair_vgg13_to_resnet8x4(run_job, teacher_checkpoints):
    """vgg13 -> MobileNetV2 is refused (no pre-activation maps); vgg13's deepest stages (256/512/512 at 8/4/4) over
    resnet8x4's (64/128/256 at 32/16/8) are wider, and the student maps are pooled to the teacher's size."""
    record = one_epoch(run_job, teacher_checkpoints, "mgd", "vgg13", "resnet8x4")
    assert record["status"] == "completed"
