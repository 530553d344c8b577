"""reviewkd (knowledge review): attention-based fusion (ABF) of the student's stages, deep to shallow, matched to
the teacher's with a hierarchical context loss (HCL)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.distill import create_method
from tests.helpers import assert_refuses, close, method_options, np_block_pool, rand64


def test_hcl_loss_matches_explicit_pyramid_pooling():
    from kdbench.methods.reviewkd import hcl_loss

    f_s = [rand64(2, 3, 8, 8, seed=70), rand64(2, 2, 2, 2, seed=71), rand64(2, 4, 1, 1, seed=72)]
    f_t = [rand64(2, 3, 8, 8, seed=73), rand64(2, 2, 2, 2, seed=74), rand64(2, 4, 1, 1, seed=75)]
    total = 0.0
    for fs, ft in zip(f_s, f_t):
        fs, ft = fs.numpy(), ft.numpy()
        h = fs.shape[2]
        loss, weight, wsum = ((fs - ft) ** 2).mean(), 1.0, 1.0
        for l in (4, 2, 1):
            if l < h:
                weight /= 2
                ps = np.stack([np_block_pool(x, l) for x in fs])
                pt = np.stack([np_block_pool(x, l) for x in ft])
                loss += weight * ((ps - pt) ** 2).mean()
                wsum += weight
        total += loss / wsum
    close(hcl_loss(f_s, f_t), total)


def test_abf_fusion_matches_manual_computation():
    from kdbench.methods.reviewkd import ABF

    torch.manual_seed(0)
    abf = ABF(3, 4, 5, fuse=True).double().eval()
    x, y = rand64(2, 3, 4, 4, seed=80), rand64(2, 4, 2, 2, seed=81)
    out, res = abf(x, y, (8, 8))
    bn_scale = 1 / math.sqrt(1 + 1e-5)  # eval-mode BN at init: weight 1, bias 0, running mean 0, var 1
    h = torch.nn.functional.conv2d(x, abf.conv1[0].weight) * bn_scale
    y_up = y.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest 2x upsampling
    att = torch.sigmoid(torch.nn.functional.conv2d(torch.cat([h, y_up], 1), abf.att_conv[0].weight, abf.att_conv[0].bias))
    fused = h * att[:, :1] + y_up * att[:, 1:]
    fused = fused.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # to the 8x8 teacher size
    expected = torch.nn.functional.conv2d(fused, abf.conv2[0].weight, padding=1) * bn_scale
    torch.testing.assert_close(res, fused)
    torch.testing.assert_close(out, expected)


def test_reviewkd_derives_mdistillers_abf_layout_and_warms_up_its_term(benchmark_pair):
    m = create_method(method_options("reviewkd"), benchmark_pair)
    # mdistiller's default config, listed shallow -> deep: IN/OUT [64, 128, 256, 256], shapes [32, 16, 8, 1]
    deep_first = list(m.abfs)
    assert [a.conv1[0].in_channels for a in deep_first][::-1] == [64, 128, 256, 256]
    assert [a.conv2[0].out_channels for a in deep_first][::-1] == [64, 128, 256, 256]
    assert [a.conv1[0].out_channels for a in deep_first] == [256] * 4
    assert m.out_sizes == [(32, 32), (16, 16), (8, 8), (1, 1)]
    assert [a.att_conv is None for a in deep_first] == [True, False, False, False]
    assert m.student_taps == ("stage1", "stage2", "stage3", "embedding")
    assert m.teacher_taps == ("stage1_pre", "stage2_pre", "stage3_pre", "embedding")
    assert m.term_weights(1) == pytest.approx({"ce": 1.0, "reviewkd": 0.25})
    assert m.term_weights(20) == m.term_weights(100) == {"ce": 1.0, "reviewkd": 5.0}


def test_reviewkd_refuses_models_without_pre_activation_taps():
    assert_refuses("reviewkd", "lenet5", "lenet5_half", "stage1_pre")


def test_reviewkd_refuses_models_with_different_numbers_of_stages():
    assert_refuses("reviewkd", "vgg8", "resnet8", "same number of stages")


def test_reviewkd_student_preact_feeds_the_pre_activation_stages_to_the_abfs(benchmark_pair):
    """student_preact (mdistiller STU_PREACT, its ImageNet configs): the student's stageN_pre maps (negative values
    kept) and the pooled embedding enter the ABFs; the teacher side is unchanged; the CIFAR default keeps post-ReLU."""
    from kdbench.methods.reviewkd import hcl_loss
    from tests.helpers import forward

    m = create_method(method_options("reviewkd", student_preact=True), benchmark_pair)
    assert m.student_taps == ("stage1_pre", "stage2_pre", "stage3_pre", "embedding")
    assert m.teacher_taps == ("stage1_pre", "stage2_pre", "stage3_pre", "embedding")
    assert create_method(method_options("reviewkd"), benchmark_pair).student_taps[0] == "stage1"
    s_out, t_out = forward(benchmark_pair, m)
    assert bool((s_out["stage1_pre"] < 0).any())
    m.eval()
    feats = [s_out["embedding"][:, :, None, None], s_out["stage3_pre"], s_out["stage2_pre"], s_out["stage1_pre"]]
    sizes = [(1, 1), (8, 8), (16, 16), (32, 32)]
    out, res = m.abfs[0](feats[0], out_size=sizes[0])
    fused = [out]
    for x, abf, size in zip(feats[1:], m.abfs[1:], sizes[1:]):
        out, res = abf(x, res, size)
        fused.insert(0, out)
    targets = [t_out["stage1_pre"], t_out["stage2_pre"], t_out["stage3_pre"], t_out["embedding"][:, :, None, None]]
    close(m.terms(None, s_out, t_out)["reviewkd"], hcl_loss(fused, targets).item())


def test_reviewkd_student_preact_refuses_a_student_without_pre_activation_taps():
    import pytest
    from kdbench.errors import IncompatibleModels
    from tests.conftest import make_pair

    pair = make_pair("ResNet50", "MobileNetV2", input_shape=(3, 32, 32))  # MobileNetV2 has no stageN_pre (§3.3)
    with pytest.raises(IncompatibleModels, match="stage1_pre"):
        create_method(method_options("reviewkd", student_preact=True), pair)
