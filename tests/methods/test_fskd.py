"""fskd (Li et al. CVPR 2020): per block a C x C 1x1 conv before the final ReLU, solved by least squares on a few
samples so the student's pre-activation block output matches the teacher's, then absorbed into conv + BN; and the
N-shot transfer sets (dataset.samples_per_class)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import create_method
from kdbench.errors import IncompatibleModels
from tests.conftest import TINY_SYNTHETIC, make_pair
from tests.helpers import close, method_options, rand64
from tests.methods.feature_helpers import one_epoch, teacher_checkpoints  # noqa: F401  (fixture)


def test_the_pointwise_conv_is_the_least_squares_fit_of_every_position():
    from kdbench.methods.fskd import fskd_least_squares

    r, o, t = rand64(3, 4, 2, 2, seed=1), rand64(3, 4, 2, 2, seed=2), rand64(3, 4, 2, 2, seed=3)
    q = fskd_least_squares(r, o, t)
    rows = r.permute(0, 2, 3, 1).reshape(-1, 4).numpy()
    target = (t - o).permute(0, 2, 3, 1).reshape(-1, 4).numpy()
    x, *_ = np.linalg.lstsq(rows, target, rcond=None)  # the code's np.linalg.lstsq, weight = x^T
    assert np.abs(q.numpy() - x.T).max() < 1e-8


def test_absorbing_q_into_conv_and_batchnorm_leaves_the_eval_function_unchanged():
    from kdbench.methods.fskd import absorb_pointwise

    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=True).double(), nn.BatchNorm2d(4).double()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    bn.eval()
    q = rand64(4, 4, seed=4)
    x = rand64(2, 3, 5, 5, seed=5)
    before = F.conv2d(bn(conv(x)), q[:, :, None, None])
    absorb_pointwise(conv, bn, q)
    assert torch.allclose(bn(conv(x)), before, atol=1e-10)


def test_the_alignment_lowers_the_block_mismatch_and_absorbs_into_the_student(teacher_checkpoints):
    """Align resnet8 to resnet14 on random inputs with a stand-in step; the student alone then computes the aligned
    function and every level's residual is at most the one of the identity Q."""
    from kdbench.data.loader import Batch
    from kdbench.methods.fskd import block_alignment_loss

    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    m = create_method(method_options("fskd"), pair)
    pair.teacher.eval()
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    batch = Batch(x, torch.arange(8) % 10, torch.arange(8), torch.zeros(8, 2, dtype=torch.long), torch.zeros(8, dtype=bool))

    class Loader:
        def epoch(self, seed=0):
            return iter([batch])

    class Step:
        epoch = 240

        def forward(self, inputs, taps):
            return pair.student.forward_taps(inputs, taps)

        def teacher(self, b):
            with torch.no_grad():
                return pair.teacher.forward_taps(b.inputs, m.teacher_taps)

    pair.student.eval()
    with torch.no_grad():
        s_pre = pair.student.forward_taps(x, ("stage1_pre",))["stage1_pre"]
        r = m._captured[0]
        t_pre = pair.teacher.forward_taps(x, ("stage1_pre",))["stage1_pre"]
        identity = float(block_alignment_loss(r, s_pre - r, t_pre, torch.eye(16)))
    residuals = m.align_and_absorb(Loader(), Step())
    assert bool(m.aligned) and residuals[0] <= identity + 1e-6
    assert all(torch.equal(m.q(i), torch.eye(m.q(i).shape[0])) for i in range(3))  # absorbed: the hooks are no-ops
    with torch.no_grad():
        aligned = pair.student.forward_taps(x, ("stage1_pre",))["stage1_pre"]
    close(float(((aligned - t_pre) ** 2).mean()), residuals[0], tol=1e-4)


def test_wrn_students_keep_q_in_a_hook_because_no_conv_feeds_their_pre_activation_bn():
    m = create_method(method_options("fskd"), make_pair("wrn_40_2", "wrn_16_2"))
    assert m._absorbable == [False, False, False]
    m = create_method(method_options("fskd"), make_pair("vgg13", "vgg8"))
    assert m._absorbable == [True, True, True, True]


@pytest.mark.parametrize("teacher,student,needle", [("vgg13", "MobileNetV2", "lacks tap"),
                                                    ("ResNet50", "ResNet18", "width")])
def test_fskd_refuses_students_without_pre_activation_maps_or_equal_widths(teacher, student, needle):
    with pytest.raises(IncompatibleModels, match=needle):
        create_method(method_options("fskd"), make_pair(teacher, student))


# ---------------------------------------------------------------- the N-shot transfer set (dataset.samples_per_class)


def test_samples_per_class_keeps_a_seeded_subset_of_that_many_per_class_and_names_the_dataset(tmp_path):
    from kdbench.config import DatasetConfig
    from kdbench.data.datasets import dataset_label, load_splits, planned_train_size

    cfg = DatasetConfig(name="synthetic", num_classes=10, image_shape=[3, 8, 8], mean=[0.5] * 3, std=[0.25] * 3,
                        train_size=200, test_size=20, samples_per_class=3, root=str(tmp_path))
    train, _ = load_splits(cfg)
    assert torch.bincount(train.labels, minlength=10).tolist() == [3] * 10
    again, _ = load_splits(cfg)
    assert torch.equal(train.images, again.images)
    assert dataset_label(cfg) == "synthetic-3shot" and planned_train_size(cfg) == 30
    other, _ = load_splits(DatasetConfig(**{**cfg.__dict__, "seed": 1}))
    assert not torch.equal(train.images, other.images)
    with pytest.raises(Exception, match="samples_per_class"):
        DatasetConfig(**{**cfg.__dict__, "samples_per_class": 0})


def test_a_job_on_a_few_shot_set_aligns_after_its_last_epoch(run_job, teacher_checkpoints, tmp_path):
    record = run_job(*TINY_SYNTHETIC, "dataset.image_shape=[3,16,16]", "dataset.samples_per_class=3",
                     "teacher=resnet14", "student=resnet8", "method=fskd",
                     f"teacher.checkpoint={teacher_checkpoints('resnet14')}")
    assert record["status"] == "completed" and record["n_train"] == 30 and record["dataset"] == "synthetic-3shot"
    state = torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)
    assert bool(state["method"]["aligned"])


@pytest.mark.slow
def test_fskd_job_runs_resnet32x4_to_resnet8x4(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "fskd", "resnet32x4", "resnet8x4")
    assert record["status"] == "completed" and record["fskd_levels"] == ["stage1_pre", "stage2_pre", "stage3_pre"]


@pytest.mark.slow
def test_fskd_job_runs_the_cross_architecture_pair_vgg13_to_vgg8(run_job, teacher_checkpoints):
    """vgg13 -> MobileNetV2 is refused (no pre-activation maps); a VGG pair of equal widths trains and aligns."""
    assert one_epoch(run_job, teacher_checkpoints, "fskd", "vgg13", "vgg8")["status"] == "completed"


def test_no_gradient_reaches_the_teacher_in_the_transfer_set_training():
    from tests.conftest import make_batch
    from tests.helpers import assert_no_teacher_grad, forward

    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    m = create_method(method_options("fskd"), pair)
    s, t = forward(pair, m, n=3, shape=(3, 16, 16))
    assert_no_teacher_grad(m.all_terms(make_batch(3, 10), s, t)["kd"], *t.values())
