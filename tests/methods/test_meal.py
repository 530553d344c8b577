"""meal (MEAL): one teacher drawn per iteration, a similarity loss and a discriminator per block. The losses are
checked against explicit loops, the discriminator against the repo's layer sizes, the teacher draws for uniformity and
replay, the discriminators' own SGD against torch.optim.SGD, and the adversarial modes by the gradient's sign."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.distill import create_method, method_class
from kdbench.errors import IncompatibleModels, KDBenchError
from kdbench.methods.meal import (MealDiscriminator, block_vector, meal_discriminator_loss, meal_similarity_loss)
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair
from tests.helpers import close, method_options, np_softmax, rand64
from tests.methods.multi_teacher_helpers import (FakeTeacher, ensemble_pair, teacher_checkpoint,  # noqa: F401
                                                 teachers_overrides)


# ----------------------------------------------------------------------------- the losses


def test_the_soft_cross_entropy_similarity_matches_explicit_loops():
    s, t = rand64(3, 5, seed=1, scale=2.0), rand64(3, 5, seed=2, scale=2.0)
    want = -sum(sum(np_softmax(t[i].numpy())[c] * math.log(np_softmax(s[i].numpy())[c]) for c in range(5))
                for i in range(3)) / 3
    close(meal_similarity_loss(s, t, "ce"), want)


@pytest.mark.parametrize("kind", ["l1", "l2", "l1_soft", "l2_soft"])
def test_the_distance_similarities_are_means_over_every_entry(kind):
    s, t = rand64(3, 4, seed=3, scale=2.0), rand64(3, 4, seed=4, scale=2.0)
    a, b = s.numpy(), t.numpy()
    if kind.endswith("soft"):
        a, b = np.stack([np_softmax(r) for r in a]), np.stack([np_softmax(r) for r in b])
    diff = [a[i, j] - b[i, j] for i in range(3) for j in range(4)]
    want = sum(abs(d) for d in diff) / 12 if kind.startswith("l1") else sum(d * d for d in diff) / 12
    close(meal_similarity_loss(s, t, kind), want)


def test_an_unknown_similarity_is_refused():
    with pytest.raises(KDBenchError, match="similarity"):
        meal_similarity_loss(rand64(2, 3), rand64(2, 3), "cosine")


def test_the_discriminator_loss_is_the_mean_bce_with_student_rows_1_0_and_teacher_rows_0_1():
    d_s, d_t = rand64(3, 2, seed=5, scale=2.0), rand64(3, 2, seed=6, scale=2.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    bce = lambda x, y: -(y * math.log(sig(x)) + (1 - y) * math.log(1 - sig(x)))  # noqa: E731
    total = sum(bce(d_s[i, 0], 1) + bce(d_s[i, 1], 0) + bce(d_t[i, 0], 0) + bce(d_t[i, 1], 1) for i in range(3))
    close(meal_discriminator_loss(d_s, d_t), float(total) / 12)


def test_a_feature_map_block_is_pooled_over_positions_into_dim_bins_then_averaged_over_channels():
    f = rand64(2, 3, 2, 3, seed=7)  # 6 positions into 4 adaptive bins: [0,2), [1,3), [3,5), [4,6)
    flat = f.numpy().reshape(2, 3, 6)
    bins = [(math.floor(k * 6 / 4), math.ceil((k + 1) * 6 / 4)) for k in range(4)]
    want = np.array([[sum(flat[n, c, a:b].mean() for c in range(3)) / 3 for a, b in bins] for n in range(2)])
    np.testing.assert_allclose(block_vector(f, 4).numpy(), want, rtol=1e-12)
    v = rand64(2, 5, seed=8)
    assert block_vector(v) is v  # vectors (logits, embeddings) are used as they are
    with pytest.raises(KDBenchError, match="block_dims"):
        block_vector(f)


def test_no_gradient_reaches_the_teacher_side():
    s = rand64(3, 10, seed=9).requires_grad_(True)
    t = rand64(3, 10, seed=10).requires_grad_(True)
    d = MealDiscriminator(10).double()
    (meal_similarity_loss(s, t) + meal_discriminator_loss(d(s), d(t.detach()))).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- the discriminator


def test_the_discriminator_halves_twice_to_two_scores_with_a_relu_after_every_layer():
    d = MealDiscriminator(100)
    linears = [m for m in d.body if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(100, 50), (50, 25), (25, 2)]
    assert d.final_relu and (d(torch.randn(64, 100)) >= 0).all()
    assert (MealDiscriminator(100, final_relu=False)(torch.randn(256, 100)) < 0).any()
    with pytest.raises(KDBenchError, match="empty layer"):
        MealDiscriminator(3)


def test_resnet32x4_to_resnet8x4_at_100_classes_adds_the_logit_discriminators_6377_parameters(benchmark_pair):
    method = create_method(method_options("meal"), benchmark_pair)
    # 100*50 + 50  +  50*25 + 25  +  25*2 + 2
    assert count_parameters(method) == 5050 + 1275 + 52 == 6377
    assert method.record_fields()["discriminator_params"] == 6377


def test_feature_map_blocks_need_a_length_and_every_block_must_exist_on_all_networks():
    pair = ensemble_pair(("resnet8", "resnet14"), "resnet8")
    with pytest.raises(IncompatibleModels, match="block_dims"):
        create_method(method_options("meal", blocks=["stage2", "logits"]), pair)
    with pytest.raises(KDBenchError, match="one entry per block"):
        create_method(method_options("meal", blocks=["stage2", "logits"], block_dims=[40]), pair)
    m = create_method(method_options("meal", blocks=["stage2", "logits"], block_dims=[40, None]), pair)
    assert m.student_taps == ("stage2",) and set(m.discriminators) == {"stage2", "logits"}
    assert m.discriminators["stage2"].body[0].in_features == 40
    with pytest.raises(IncompatibleModels, match="hidden1"):
        create_method(method_options("meal", blocks=["hidden1"]), pair)
    wide = ensemble_pair(("resnet8x4", "resnet8"), "resnet8")  # embeddings 256 vs 64 wide
    with pytest.raises(IncompatibleModels, match="widths"):
        create_method(method_options("meal", blocks=["embedding"]), wide)


# ----------------------------------------------------------------------------- terms, adversarial modes


def _logit_batch(pair, method, n=6):
    batch = make_batch(n, 10)
    s = pair.student.forward_taps(batch.inputs, method.student_taps)
    pair.teacher.train(method.teacher_train_mode)
    with torch.no_grad():
        t = pair.teacher.forward_taps(batch.inputs, method.teacher_taps)
    return batch, s, t


def test_the_terms_are_the_similarity_and_the_discriminator_loss_of_each_block_and_labels_are_not_used():
    pair = make_pair("resnet14", "resnet8")
    method = create_method(method_options("meal"), pair)
    batch, s, t = _logit_batch(pair, method)
    total, terms = method.loss(batch, s, t, 1)
    d = method.discriminators["logits"]
    assert set(terms) == {"ce", "sim_logits", "adv_logits"}
    close(terms["sim_logits"], float(meal_similarity_loss(s["logits"], t["logits"]).detach()))
    close(terms["adv_logits"], float(meal_discriminator_loss(d(s["logits"]), d(t["logits"])).detach()))
    close(total, float((terms["sim_logits"] + terms["adv_logits"]).detach()))  # ce has weight 0: logged, not summed


def test_the_discriminator_term_depends_on_the_teacher_vectors():
    torch.manual_seed(0)
    d = MealDiscriminator(10, final_relu=False).double()
    s, t = rand64(4, 10, seed=20, scale=3.0), rand64(4, 10, seed=21, scale=3.0)
    other = rand64(4, 10, seed=22, scale=3.0)
    assert not torch.isclose(meal_discriminator_loss(d(s), d(t)), meal_discriminator_loss(d(s), d(other)))


@pytest.mark.parametrize("mode, sign", [("joint", 1.0), ("reverse", -1.0)])
def test_the_student_descends_the_discriminator_loss_jointly_and_ascends_it_through_the_reversal(mode, sign):
    pair = make_pair("resnet14", "resnet8")
    method = create_method(method_options("meal", adversarial=mode, final_relu=False), pair)
    batch, s, t = _logit_batch(pair, method)
    z = s["logits"].detach().requires_grad_(True)
    _, terms = method.loss(batch, {"logits": z}, t, 1)
    terms["adv_logits"].backward()
    d_grads = [p.grad.clone() for p in method.discriminators.parameters()]
    twin = copy.deepcopy(method.discriminators["logits"])
    z2 = s["logits"].detach().requires_grad_(True)
    meal_discriminator_loss(twin(z2), twin(t["logits"])).backward()  # the plain loss, no reversal
    torch.testing.assert_close(z.grad, sign * z2.grad)
    for g, p in zip(d_grads, twin.parameters()):
        torch.testing.assert_close(g, p.grad)  # the discriminators always descend their loss


# ----------------------------------------------------------------------------- teacher selection and the step


def _step(teachers, epoch=1):
    """The parts of kdbench.train.StepContext that forward_loss reads."""
    return SimpleNamespace(teachers=teachers, epoch=epoch, forward=lambda x, taps: {"logits": torch.zeros(len(x), 10)})


def test_each_iteration_runs_one_teacher_drawn_uniformly_and_the_draws_replay_per_epoch():
    pair = ensemble_pair(("resnet8", "resnet8", "resnet8"), "resnet8", seed=4)
    method = create_method(method_options("meal"), pair)
    draws = [method.select_teacher(1, 3) for _ in range(3000)]
    counts = np.bincount(draws, minlength=3)
    assert abs(counts - 1000).max() < 100  # uniform (binomial sd ~26)
    replay = create_method(method_options("meal"), pair)
    assert [replay.select_teacher(1, 3) for _ in range(50)] == draws[:50]  # the same seed and epoch: the same draws
    assert [replay.select_teacher(2, 3) for _ in range(50)] != draws[:50]
    fakes = [FakeTeacher({"logits": torch.randn(4, 10)}) for _ in range(3)]
    batch = make_batch(4, 10)
    for _ in range(30):
        method.forward_loss(batch, _step(fakes, epoch=5))
    assert sum(f.calls for f in fakes) == 30 and all(f.calls > 0 for f in fakes)  # one forward per step


def test_the_discriminators_own_sgd_matches_torch_sgd_at_the_scheduled_rate():
    pair = make_pair("resnet14", "resnet8", lr=0.1)
    method = create_method(method_options("meal"), pair)
    assert list(method.trainable_parameters()) == []  # stepped by the method, not the run's optimizer
    twin = copy.deepcopy(method.discriminators)
    sgd = torch.optim.SGD(twin.parameters(), lr=1e-3 * 0.01 / 0.1, momentum=0.9, weight_decay=5e-4)
    for k in range(3):
        for d in (method.discriminators, twin):
            for p in d.parameters():
                p.grad = torch.full_like(p, 0.1 * (k + 1)) + p.detach() ** 2
        method.step_discriminators(1e-3 * 0.01 / 0.1)
        sgd.step()
    for a, b in zip(method.discriminators.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)
    assert any(k.startswith("momentum_") for k in method.state_dict())  # the buffers are checkpointed


def test_a_null_discriminator_lr_puts_the_discriminators_in_the_runs_optimizer():
    pair = make_pair("resnet14", "resnet8")
    method = create_method(method_options("meal", discriminator_lr=None), pair)
    assert {id(p) for p in method.trainable_parameters()} == {id(p) for p in method.discriminators.parameters()}
    assert method.record_fields()["discriminator_optimizer"] == "the run's optimizer"


def test_the_defaults_are_the_repos_ensemble_command():
    cfg = method_options("meal")
    assert (list(cfg.blocks), cfg.similarity, cfg.adversarial, cfg.final_relu, cfg.discriminator_lr,
            cfg.teacher_train_mode) == (["logits"], "ce", "joint", True, 1e-3, True)
    assert dict(cfg.weights) == {"ce": 0.0, "sim_logits": 1.0, "adv_logits": 1.0}
    assert method_class("meal").multi_teacher and method_class("meal").teacher_train_mode


def test_unknown_modes_are_refused():
    pair = make_pair("resnet14", "resnet8")
    for option in ({"adversarial": "alternate"}, {"similarity": "kl"}):
        with pytest.raises(KDBenchError, match=next(iter(option))):
            create_method(method_options("meal", **option), pair)


# ----------------------------------------------------------------------------- jobs


def test_a_job_with_two_teachers_trains_the_student_and_its_discriminator_and_replays(run_job, teacher_checkpoint,
                                                                                         tmp_path):
    overrides = [*TINY_SYNTHETIC, "student=resnet8", "method=meal",
                 *teachers_overrides(teacher_checkpoint, "resnet8", "resnet8")]
    rec = run_job(*overrides)
    assert rec["status"] == "completed" and rec["teacher"] == "resnet8+resnet8"
    assert set(rec["history"][0]["train"]) == {"loss", "ce", "sim_logits", "adv_logits"}
    assert rec["extra_params"] == rec["discriminator_params"] == 5 * 10 + 5 + 2 * 5 + 2 + 2 * 2 + 2
    assert rec["trained_networks"] == ["student", "discriminator[logits]"] and rec["evaluated_head"] == "student"
    again = run_job(*overrides, name="again")
    assert [h["train"] for h in again["history"]] == [h["train"] for h in rec["history"]]
    ckpt = torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)
    assert any(k.startswith("momentum_") and v.abs().sum() > 0 for k, v in ckpt["method"].items())


@pytest.mark.slow
@pytest.mark.parametrize("teachers, student, options", [
    (("resnet32x4", "resnet32x4"), "resnet8x4", []),
    (("vgg13", "resnet32x4"), "MobileNetV2", ["method.adversarial=reverse", "method.blocks=[stage2,logits]",
                                              "method.block_dims=[64,null]", "+method.weights.sim_stage2=0.1",
                                              "+method.weights.adv_stage2=1"])])
def test_jobs_on_the_benchmark_pair_and_a_cross_architecture_ensemble(run_job, teacher_checkpoint, teachers, student,
                                                                      options):
    rec = run_job(*TINY_SYNTHETIC, f"student={student}", "method=meal",
                  *teachers_overrides(teacher_checkpoint, *teachers), *options)
    assert rec["status"] == "completed" and rec["teacher"] == "+".join(teachers)
    blocks = ["logits"] if not options else ["stage2", "logits"]
    assert set(rec["history"][0]["train"]) == {"loss", "ce", *(f"{k}_{b}" for b in blocks for k in ("sim", "adv"))}
    assert rec["extra_params"] == rec["discriminator_params"] > 0
