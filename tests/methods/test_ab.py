"""ab (activation boundaries): a pre-training stage that matches the student's pre-activation signs to the
teacher's (through connectors where widths differ), then plain CE training."""
from __future__ import annotations

import pytest
import torch

from kdbench.distill import create_method
from kdbench.errors import IncompatibleModels
from kdbench.models import count_parameters
from tests.conftest import make_batch, make_pair
from tests.helpers import assert_refuses, close, method_options, rand64


def test_ab_loss_matches_explicit_loops():
    from kdbench.methods.ab import ab_loss

    g_s = [rand64(2, 2, 3, 3, seed=50) * 2, rand64(2, 3, 2, 2, seed=51) * 2]
    g_t = [rand64(2, 2, 3, 3, seed=52), rand64(2, 3, 2, 2, seed=53)]
    m = 1.0
    total = 0.0
    for level, (s, t) in enumerate(zip(g_s, g_t)):
        acc = 0.0
        for a, b in zip(s.numpy().ravel(), t.numpy().ravel()):
            if a > -m and b <= 0:
                acc += (a + m) ** 2
            if a <= m and b > 0:
                acc += (a - m) ** 2
        total += 2.0 ** (level - 2 + 1) * acc / 2 * 3 / 1000
    close(ab_loss(g_s, g_t, m), total)


def test_ab_distills_in_its_pre_training_stage_and_trains_only_ce_afterwards():
    pair = make_pair("resnet14", "resnet8")
    m = create_method(method_options("ab", stage_epochs=3), pair)
    assert all(isinstance(c, torch.nn.Identity) for c in m.connectors)  # same widths: identity connectors
    [stage] = m.stages(pair.student, pair.teacher)
    assert (stage.epochs, stage.lr) == (3, 0.05)
    assert stage.student_taps == stage.teacher_taps == ("stage1_pre", "stage2_pre", "stage3_pre")
    ids = {id(p) for p in stage.parameters}
    assert all(id(p) not in ids for p in pair.student.fc.parameters())
    assert len(ids) == sum(1 for _ in pair.student.parameters()) - 2
    assert list(m.trainable_parameters()) == [] and m.student_taps == ()
    batch = make_batch(4, 10)
    s_out = pair.student.forward_taps(batch.inputs)
    total, terms = m.loss(batch, s_out, None, 1)
    assert set(terms) == {"ce"}
    # mismatched widths get ConvReg connectors (conv + BN, no ReLU); they train in the stage only
    wide = make_pair("resnet8x4", "resnet8")
    m = create_method(method_options("ab"), wide)
    assert all(not isinstance(c, torch.nn.Identity) for c in m.connectors)
    [stage] = m.stages(wide.student, wide.teacher)
    conn_ids = {id(p) for p in m.connectors.parameters()}
    assert conn_ids <= {id(p) for p in stage.parameters}
    assert count_parameters(m) == sum(cs * ct + ct + 2 * ct for cs, ct in ((16, 64), (32, 128), (64, 256)))
    assert m.stages(wide.student, wide.teacher)[0].epochs == 30
    assert create_method(method_options("ab", stage_epochs=0), wide).stages(wide.student, wide.teacher) == []
    # a model without stageN_pre taps contributes stageN (RD ignores preact for MobileNetV2) unless told not to
    lenet = make_pair("lenet5", "lenet5_half", input_shape=(1, 32, 32))
    assert create_method(method_options("ab"), lenet).pairs == [("stage1", "stage1"), ("stage2", "stage2")]
    with pytest.raises(IncompatibleModels, match="stage1_pre"):
        create_method(method_options("ab", preact_fallback=False), lenet)


def test_ab_refuses_models_without_feature_maps():
    assert_refuses("ab", "mlp_1200x2", "mlp_800x2", "(C, H, W)")


def test_ab_refuses_models_with_different_numbers_of_stages():
    assert_refuses("ab", "vgg8", "resnet8", "same number of stages")
