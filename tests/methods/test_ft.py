"""ft (factor transfer): a paraphraser pre-trained on the teacher's last map, a translator on the student's, L1
between their normalised factors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.distill import create_method
from kdbench.methods.ft import Paraphraser, Translator, ft_loss, paraphraser_loss, rd_stage_lr
from kdbench.models import count_parameters
from tests.conftest import make_batch, make_pair
from tests.helpers import (assert_no_teacher_grad, forward, method_options, np_attention, np_block_pool, rng,
                           t64)


def test_ft_loss_matches_loops_in_both_variants():
    r = rng(8)
    fs, ft = r.normal(size=(2, 3, 4, 4)), r.normal(size=(2, 3, 8, 8))
    ftp = np_block_pool(ft, 4)
    ref = np.abs(np_attention(fs) - np_attention(ftp)).mean()
    paper = 0.0
    for n in range(2):
        a, b = fs[n].ravel(), ftp[n].ravel()
        paper += np.abs(a / math.sqrt((a ** 2).sum()) - b / math.sqrt((b ** 2).sum())).sum() / a.size / 2
    s, t = t64(fs).requires_grad_(), t64(ft).requires_grad_()
    assert ft_loss(s, t, "reference").item() == pytest.approx(ref, rel=1e-10)
    got = ft_loss(s, t, "paper")
    assert got.item() == pytest.approx(paper, rel=1e-10)
    assert_no_teacher_grad(got, t)


def test_ft_modules_have_the_reference_sizes_and_the_stage_lr_follows_rds_rule():
    assert count_parameters(Paraphraser(256)) == 2_065_536  # methods.md §3.4, resnet32x4 -> resnet8x4
    assert count_parameters(Translator(256, 256)) == 1_033_728
    assert count_parameters(Paraphraser(64)) == 129_312 and count_parameters(Translator(64, 64)) == 64_896  # resnet56->20
    p = Paraphraser(8)
    x = torch.randn(2, 8, 4, 4)
    assert p(x).shape == x.shape and p.encoder(x).shape == (2, 4, 4, 4)
    assert paraphraser_loss(p(x), x).item() == pytest.approx(((p(x) - x) ** 2).mean().item())
    assert rd_stage_lr("resnet8x4", 0.05) == 0.01 and rd_stage_lr("wrn_16_2", 0.05) == 0.01
    assert rd_stage_lr("vgg8", 0.05) == 0.05 and rd_stage_lr("mlp_32", 0.1) == 0.1


def test_ft_optimizes_the_translator_in_main_training_and_the_paraphraser_in_its_stage():
    pair = make_pair("resnet32x4", "resnet8x4", num_classes=100, input_shape=(3, 32, 32))
    ft = create_method(method_options("ft"), pair)
    assert count_parameters(ft.paraphraser) == 2_065_536 and count_parameters(ft.translator) == 1_033_728
    main = {id(p) for p in ft.trainable_parameters()}
    assert main == {id(p) for p in ft.translator.parameters()}
    (stage,) = ft.stages(pair.student, pair.teacher)
    assert stage.name == "paraphraser" and stage.epochs == 30 and stage.lr == 0.01 and stage.student_taps == ()
    assert {id(p) for p in stage.parameters} == {id(p) for p in ft.paraphraser.parameters()}


def test_ft_stage_trains_only_the_paraphraser_and_main_stage_leaves_it_alone():
    small = (3, 16, 16)  # CIFAR ResNets run on 16x16 inputs too (maps 16/8/4): cheaper forwards for the deep pair
    pair = make_pair("resnet56", "resnet20", num_classes=100, input_shape=small)
    ft = create_method(method_options("ft", stage_epochs=1), pair)
    (stage,) = ft.stages(pair.student, pair.teacher)
    s_out, t_out = forward(pair, ft, shape=small)
    stage.loss(None, s_out, t_out).backward()
    assert all(p.grad is not None for p in ft.paraphraser.parameters())
    assert all(p.grad is None for p in ft.translator.parameters())
    for p in ft.paraphraser.parameters():
        p.grad = None
    s_out, t_out = forward(pair, ft, shape=small)
    _, terms = ft.loss(make_batch(2, 100, small), s_out, t_out, 1)
    terms["ft"].backward()
    assert all(p.grad is None for p in ft.paraphraser.parameters())
    assert all(p.grad is not None for p in ft.translator.parameters())
    assert all(t.grad is None for t in t_out.values())
