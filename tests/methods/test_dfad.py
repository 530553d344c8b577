"""dfad (Fang et al. 2019): the student minimises the teacher-student mean absolute logit error on generated images,
the generator maximises it. Losses against NumPy; the iteration's order (student steps, then the generator's) and
its updates against twins updated by hand."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from kdbench.distill import create_method
from kdbench.methods.dfad import dfad_generator_loss, dfad_student_loss
from tests.conftest import make_pair
from tests.helpers import close, method_options, rand64
from tests.methods.datafree_helpers import assert_adam_step_equal, assert_params_equal, params, real_step

SMALL = (3, 16, 16)


def test_student_loss_is_the_mean_absolute_logit_error_and_sends_nothing_to_the_teacher():
    z_s, z_t = rand64(4, 5, seed=1).requires_grad_(), rand64(4, 5, seed=2).requires_grad_()
    expected = np.abs(z_s.detach().numpy() - z_t.detach().numpy()).mean()
    loss = dfad_student_loss(z_s, z_t)
    close(loss, expected)
    loss.backward()
    assert z_t.grad is None and z_s.grad.abs().sum() > 0


def test_generator_loss_is_minus_the_l1_or_minus_log_one_plus_l1_through_both_sides():
    z_s, z_t = rand64(4, 5, seed=3).requires_grad_(), rand64(4, 5, seed=4).requires_grad_()
    l1 = float(np.abs(z_s.detach().numpy() - z_t.detach().numpy()).mean())
    close(dfad_generator_loss(z_s, z_t), -l1)
    loss = dfad_generator_loss(z_s, z_t, "log")
    close(loss, -math.log(1 + l1))
    loss.backward()
    assert z_t.grad is not None and z_s.grad is not None  # the generator's gradient flows through both networks
    with pytest.raises(ValueError):
        dfad_generator_loss(z_s, z_t, "hinge")


def _method(**options):
    pair = make_pair("resnet14", "resnet8", 10, SMALL, epochs=3)
    base = {"batch_size": 4, "iterations": 1, "latent_dim": 8, "student_steps": 2}
    return pair, create_method(method_options("dfad", **{**base, **options}), pair)


def test_an_iteration_is_student_steps_on_fresh_images_then_one_generator_step_on_another_batch():
    pair, method = _method()
    twin_gen, twin_student = copy.deepcopy(method.generator), copy.deepcopy(pair.student)
    step = real_step(pair, method, lr=0.1)
    batch = next(iter(method.batches(None, 11)))
    assert batch.inputs.shape == (8, *SMALL) and not batch.inputs.requires_grad  # 2 student batches of 4
    noise = torch.Generator()
    noise.set_state(method._noise.get_state())
    z_g = torch.randn(4, 8, generator=noise)  # the generator step's draw comes next
    total, terms = method.train_step(batch, step)

    pair.teacher.eval()
    losses = []
    for k in range(2):  # by hand: the student's two SGD steps, each on its own block, images from the twin generator
        with torch.no_grad():
            x = twin_gen.train()(batch.latent[4 * k:4 * k + 4])
            z_t = pair.teacher(x)
        twin_student.zero_grad()
        loss = (twin_student(x) - z_t).abs().mean()
        loss.backward()
        with torch.no_grad():
            for p in twin_student.parameters():
                p -= 0.1 * p.grad
        losses.append(loss.item())
    assert_params_equal(pair.student, params(twin_student))
    close(terms["l1"], sum(losses) / 2, tol=1e-5)

    # then the generator: -L1 on fresh images through the updated student (train mode) and the teacher, Adam 1e-3
    twin_student.zero_grad()
    x = twin_gen(z_g)
    adversarial = -(twin_student(x) - pair.teacher(x)).abs().mean()
    opt = torch.optim.Adam(twin_gen.parameters(), lr=1e-3)
    adversarial.backward()
    opt.step()
    assert_adam_step_equal(method.generator, twin_gen)
    close(terms["adversarial"], adversarial.item(), tol=1e-5)
    close(total, terms["l1"] + terms["adversarial"], tol=1e-5)
    assert all(p.grad is None for p in pair.teacher.parameters())


def test_the_cifar100_generator_lr_drops_tenfold_after_epochs_99_and_199():
    pair, method = _method()
    step = real_step(pair, method, epoch=100)
    method.train_step(next(iter(method.batches(None, 1))), step)
    assert method.generator_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    mnist = create_method(method_options("dfad_mnist"), make_pair("lenet5", "lenet5_half", 10, (1, 28, 28)))
    assert mnist.generator_schedule == "constant" and mnist.batch_size == 512
