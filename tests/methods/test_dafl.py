"""dafl (Chen et al. ICCV 2019): a generator trained so the fixed teacher's outputs are one-hot, strongly activated and
class-balanced; the student learns the teacher's softmax on the generated images. Losses against NumPy, the step
against a twin generator and student updated by hand, and the pairs it refuses."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from kdbench.distill import create_method
from kdbench.errors import IncompatibleModels
from kdbench.methods.dafl import activation_loss, dafl_generator_losses, information_entropy_loss, one_hot_loss
from tests.conftest import make_pair
from tests.helpers import close, method_options, np_ce, np_kl, np_softmax, rand64
from tests.methods.datafree_helpers import assert_adam_step_equal, assert_moved, assert_params_equal, params, real_step

SMALL = (3, 16, 16)


# ----------------------------------------------------------------------------- the losses


def test_one_hot_loss_is_the_cross_entropy_against_the_teachers_own_argmax():
    z = rand64(5, 4, seed=3) * 2
    expected = sum(np_ce(z[i].numpy(), int(np.argmax(z[i].numpy()))) for i in range(5)) / 5
    close(one_hot_loss(z), expected)


def test_activation_loss_is_minus_the_mean_absolute_feature_or_the_per_sample_l1_norm():
    f = rand64(3, 4, 2, 2, seed=4)
    a = np.abs(f.numpy())
    close(activation_loss(f, "mean"), -a.sum() / a.size)
    close(activation_loss(f, "l1"), -a.reshape(3, -1).sum(1).mean())
    with pytest.raises(ValueError):
        activation_loss(f, "l2")


def test_information_entropy_loss_is_the_negative_entropy_of_the_mean_prediction_in_base_10_or_e():
    z = rand64(6, 5, seed=5) * 2
    pbar = np.mean([np_softmax(z[i].numpy()) for i in range(6)], axis=0)
    close(information_entropy_loss(z, 10.0), float(sum(p * math.log10(p) for p in pbar)))
    close(information_entropy_loss(z, math.e), float(sum(p * math.log(p) for p in pbar)))
    # it is smallest (-log10 C) when the batch's mean prediction is uniform over the C classes
    uniform = torch.eye(5, dtype=torch.float64) * 30
    close(information_entropy_loss(uniform), -math.log10(5), tol=1e-6)


def test_generator_losses_reach_the_images_through_the_teacher_but_not_its_weights():
    pair = make_pair("resnet14", "resnet8", 10, SMALL)
    pair.teacher.eval().requires_grad_(False)
    x = torch.randn(4, *SMALL, requires_grad=True)
    out = pair.teacher.forward_taps(x, ("embedding",))
    losses = dafl_generator_losses(out["logits"], out["embedding"])
    sum(losses.values()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in pair.teacher.parameters())


# ----------------------------------------------------------------------------- the step


def _method(**options):
    pair = make_pair("resnet14", "resnet8", 10, SMALL, epochs=3)
    base = {"batch_size": 6, "iterations": 2, "latent_dim": 8}
    return pair, create_method(method_options("dafl", **{**base, **options}), pair)


def test_a_step_moves_the_generator_by_adam_on_its_terms_and_the_student_by_sgd_on_kd_alone():
    pair, method = _method()
    twin_gen, twin_student = copy.deepcopy(method.generator), copy.deepcopy(pair.student)
    step = real_step(pair, method, lr=0.1)
    batch = next(iter(method.batches(None, 77)))
    teacher_before = params(pair.teacher)
    method.train_step(batch, step)

    # by hand: the same images from the twin generator, the weighted generator terms, one Adam step at lr_G 0.02
    x = twin_gen.train()(batch.latent)
    t = pair.teacher.forward_taps(x, ("embedding",))
    p_t = torch.softmax(t["logits"].detach(), 1)
    pbar = p_t.mean(0)
    one_hot = torch.nn.functional.cross_entropy(t["logits"], t["logits"].detach().argmax(1))
    info = (torch.softmax(t["logits"], 1).mean(0) * torch.log10(torch.softmax(t["logits"], 1).mean(0))).sum()
    act = -t["embedding"].abs().mean()
    opt = torch.optim.Adam(twin_gen.parameters(), lr=0.02)
    (0.5 * one_hot + 20.0 * info + 0.1 * act).backward()
    opt.step()
    assert_adam_step_equal(method.generator, twin_gen)
    assert torch.equal(batch.targets, p_t.argmax(1))  # the batch's labels are the teacher's argmax
    assert pbar.shape == (10,)

    # the student: KL(p_t || p_s) at T = 1 on the images (detached), one plain SGD step at lr 0.1
    s = twin_student.train()(x.detach())
    kd = (p_t * (torch.log(p_t) - torch.log_softmax(s, 1))).sum() / 6
    kd.backward()
    with torch.no_grad():
        expected = [p - 0.1 * p.grad for p in twin_student.parameters()]
    assert_params_equal(pair.student, expected)
    assert_params_equal(pair.teacher, teacher_before)  # the teacher never moves ...
    assert all(p.grad is None for p in pair.teacher.parameters())  # ... and gets no gradient


def test_the_logged_total_is_the_weighted_sum_of_generator_and_student_terms():
    pair, method = _method()
    total, terms = method.train_step(next(iter(method.batches(None, 3))), real_step(pair, method))
    assert set(terms) == {"one_hot", "activation", "info_entropy", "kd"}
    close(total, 0.5 * terms["one_hot"] + 20 * terms["info_entropy"] + 0.1 * terms["activation"] + terms["kd"],
          tol=1e-5)


def test_an_epoch_is_iterations_batches_of_batch_size_generated_images():
    pair, method = _method(iterations=3)
    batches = list(method.batches(None, 1))
    assert [b.inputs.shape for b in batches] == [torch.Size([6, *SMALL])] * 3
    assert all(b.inputs.requires_grad for b in batches)  # the generator's step backpropagates into them


def test_the_generator_and_student_both_learn_over_a_few_steps():
    pair, method = _method()
    gen0, student0 = params(method.generator), params(pair.student)
    step = real_step(pair, method)
    for batch in method.batches(None, 9):
        method.train_step(batch, step)
    assert_moved(method.generator, gen0)
    assert_moved(pair.student, student0)


# ----------------------------------------------------------------------------- pairs and options


def test_dafl_refuses_a_teacher_without_the_feature_tap():
    pair = make_pair("resnet14", "resnet8", 10, SMALL)
    with pytest.raises(IncompatibleModels, match="feature_tap"):
        create_method(method_options("dafl", feature_tap="stage4"), pair)


def test_dafl_mnist_reads_lenet5s_120_d_conv5_output_as_the_feature():
    pair = make_pair("lenet5", "lenet5_half", 10, (1, 28, 28))
    method = create_method(method_options("dafl_mnist"), pair)
    assert method.teacher_taps == ("stage3",) and pair.teacher_shapes["stage3"] == (120, 1, 1)
    assert method.generator.init_size == (7, 7) and method.generator.latent_dim == 100
    assert sum(p.numel() for p in method.parameters()) == 856_065  # see test_datafree's hand count
