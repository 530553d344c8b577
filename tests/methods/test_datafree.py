"""What the data-free methods (dafl, dfad, zskt, deepinversion/adi) share: their generators match the reference
architectures (layer by layer, parameter counts worked out by hand), they never read the training split, their
randomness replays from the run's seed, the generator's optimiser state travels with the run checkpoint, and their
records say which networks were trained."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from kdbench.distill import create_method
from kdbench.methods.datafree import ConvGenerator, generator_lr, kl_divergence
from kdbench.train import epoch_seed
from tests.conftest import TINY_SYNTHETIC, make_pair
from tests.helpers import close, method_options, np_kl, np_softmax, rand64
from tests.methods.datafree_helpers import TINY, real_step

CIFAR = (3, 32, 32)
DATA_FREE = ["dafl", "dfad", "zskt", "deepinversion", "adi"]
GENERATIVE = ["dafl", "dfad", "zskt"]
EXPECTED_TERMS = {"dafl": ("one_hot", "activation", "info_entropy", "kd"), "dfad": ("l1", "adversarial"),
                  "zskt": ("kl", "at", "adversarial"), "deepinversion": ("kd",), "adi": ("kd",)}


# ----------------------------------------------------------------------------- the generators


def _hand_count(latent: int, channels: int, init: int, ngf: int = 64, final_affine: bool = False) -> int:
    """The reference generator's parameters, layer by layer: Linear(latent, 2ngf*init^2), BN(2ngf), conv 3x3
    2ngf->2ngf, BN(2ngf), conv 3x3 2ngf->ngf, BN(ngf), conv 3x3 ngf->C, BN(C) (affine only in ZSKT)."""
    c2 = 2 * ngf
    linear = latent * c2 * init * init + c2 * init * init
    convs = (c2 * c2 * 9 + c2) + (c2 * ngf * 9 + ngf) + (ngf * channels * 9 + channels)
    bns = 2 * c2 + 2 * c2 + 2 * ngf + (2 * channels if final_affine else 0)
    return linear + convs + bns


@pytest.mark.parametrize("name, latent, final_affine", [("dafl", 1000, False), ("dfad", 256, False),
                                                         ("zskt", 100, True)])
def test_the_generator_on_resnet32x4_to_resnet8x4_is_the_only_extra_network_with_the_reference_size(
        benchmark_pair, name, latent, final_affine):
    method = create_method(method_options(name), benchmark_pair)
    # DAFL 8,423,939 (latent 1000), DFAD 2,329,091 (nz 256), ZSKT 1,051,145 (z 100, affine last BN)
    expected = {"dafl": 8_423_939, "dfad": 2_329_091, "zskt": 1_051_145}[name]
    assert _hand_count(latent, 3, 8, final_affine=final_affine) == expected
    assert sum(p.numel() for p in method.parameters()) == expected
    assert list(method.trainable_parameters()) == []  # the generator has its own optimiser


def test_generators_have_the_reference_layers_eps_and_output_activation():
    dafl = ConvGenerator(100, (1, 28, 28), 64, bn_eps=0.8, tanh=True, final_affine=False)
    assert dafl.init_size == (7, 7) and dafl.l1.out_features == 128 * 49
    assert (dafl.bn0.eps, dafl.bn1.eps, dafl.bn2.eps) == (1e-5, 0.8, 0.8)  # BatchNorm2d(128, 0.8): eps, not momentum
    assert dafl.bn3.affine is False and dafl.bn3.num_features == 1
    assert sum(p.numel() for p in dafl.parameters()) == _hand_count(100, 1, 7) == 856_065
    z = torch.randn(6, 100)
    x = dafl(z)
    assert x.shape == (6, 1, 28, 28)
    # the last layer is a non-affine BN over tanh outputs: each channel has batch mean 0 and variance ~1
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(1), atol=1e-5, rtol=0)
    zskt = ConvGenerator(100, CIFAR, tanh=False, final_affine=True)
    assert zskt.tanh is False and zskt.bn3.affine is True
    with pytest.raises(ValueError, match="divisible by 4"):
        ConvGenerator(10, (3, 30, 30))


def test_generator_layers_compute_the_reference_forward():
    """Linear -> view -> BN -> nearest 2x -> conv-BN-LReLU(0.2) -> 2x -> conv-BN-LReLU -> conv -> tanh -> BN."""
    torch.manual_seed(0)
    g = ConvGenerator(5, (2, 8, 8), width=3, bn_eps=0.8)
    z = torch.randn(4, 5)
    f = nn.functional
    h = g.l1(z).view(4, 6, 2, 2)
    h = f.batch_norm(h, None, None, g.bn0.weight, g.bn0.bias, True, 0.0, 1e-5)
    h = h.repeat_interleave(2, 2).repeat_interleave(2, 3)
    h = f.leaky_relu(f.batch_norm(g.conv1(h), None, None, g.bn1.weight, g.bn1.bias, True, 0.0, 0.8), 0.2)
    h = h.repeat_interleave(2, 2).repeat_interleave(2, 3)
    h = f.leaky_relu(f.batch_norm(g.conv2(h), None, None, g.bn2.weight, g.bn2.bias, True, 0.0, 0.8), 0.2)
    h = torch.tanh(g.conv3(h))
    h = (h - h.mean((0, 2, 3), keepdim=True)) / torch.sqrt(h.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(g(z), h, rtol=1e-5, atol=1e-5)


def test_generator_lr_follows_constant_step_and_cosine_rules():
    assert generator_lr(7, 0.02, "constant") == 0.02
    assert [generator_lr(e, 1e-3, "step", (99, 199), 0.1) for e in (1, 99, 100, 199, 200)] == \
        pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5])
    assert [generator_lr(e, 1.0, "cosine", epochs=4) for e in (1, 2, 3, 4)] == \
        pytest.approx([1.0, 0.5 * (1 + 0.7071067811865476), 0.5, 0.5 * (1 - 0.7071067811865476)])
    with pytest.raises(ValueError):
        generator_lr(1, 1.0, "linear")


def test_kl_divergence_matches_numpy_with_both_reductions():
    z_s, z_t = rand64(4, 6, seed=1) * 2, rand64(4, 6, seed=2) * 2
    for temp in (1.0, 3.0):
        total = sum(np_kl(np_softmax(z_t[i].numpy() / temp), np_softmax(z_s[i].numpy() / temp)) for i in range(4))
        close(kl_divergence(z_s, z_t, temp, "batchmean"), total / 4)
        close(kl_divergence(z_s, z_t, temp, "elementwise"), total / 24)


# ----------------------------------------------------------------------------- the method plumbing


@pytest.mark.parametrize("name", DATA_FREE)
def test_a_data_free_method_refuses_a_pair_without_a_teacher_or_with_flat_inputs(name):
    from kdbench.errors import IncompatibleModels

    with pytest.raises(IncompatibleModels, match="teacher"):
        create_method(method_options(name), make_pair(None, "resnet8", 10, (3, 16, 16)))
    if name in GENERATIVE:  # the generator upsamples 4x from its first map
        with pytest.raises(IncompatibleModels, match="divisible by 4"):
            create_method(method_options(name), make_pair("resnet14", "resnet8", 10, (3, 18, 18)))


@pytest.mark.parametrize("name", DATA_FREE)
def test_building_freezes_the_teacher_and_leaves_it_out_of_the_methods_parameters(name):
    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    method = create_method(method_options(name), pair)
    assert not any(p.requires_grad for p in pair.teacher.parameters())
    owned = {id(p) for p in method.parameters()}
    assert not owned & {id(p) for p in (*pair.teacher.parameters(), *pair.student.parameters())}
    assert method.teacher_cache is False and method.task_terms == ()


def test_the_noise_stream_replays_from_the_run_seed_and_epoch():
    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16), epochs=3)
    method = create_method(method_options("dafl", batch_size=4, iterations=2, latent_dim=8), pair)
    first = [b.latent for b in method.batches(None, epoch_seed(0, 2))]
    again = [b.latent for b in method.batches(None, epoch_seed(0, 2))]
    other = [b.latent for b in method.batches(None, epoch_seed(0, 3))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    expected = torch.randn(4, 8, generator=torch.Generator().manual_seed(epoch_seed(0, 2, 11)))
    assert torch.equal(first[0], expected)  # stream 11 of (run seed, epoch)


def test_the_generators_optimiser_state_is_saved_and_restored_with_the_method():
    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    method = create_method(method_options("dafl", batch_size=4, iterations=1, latent_dim=8), pair)
    step = real_step(pair, method)
    method.train_step(next(iter(method.batches(None, 5))), step)
    state = method.state_dict()
    assert state["_extra_state"]["generator_optimizer"]["state"]  # Adam moments after one step
    twin = create_method(method_options("dafl", batch_size=4, iterations=1, latent_dim=8),
                         make_pair("resnet14", "resnet8", 10, (3, 16, 16), seed=1))
    twin.load_state_dict(copy.deepcopy(state))
    for a, b in zip(method.generator_optimizer.state.values(), twin.generator_optimizer.state.values()):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"])
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"])


# ----------------------------------------------------------------------------- end to end


@pytest.fixture
def training_split_guard(monkeypatch):
    """The training loader's epoch() and take() raise (the test loader, shuffle=False, still evaluates); returns
    the list of attempted reads."""
    from kdbench.data import loader as loader_module

    reads = []

    def guard(real):
        def epoch(self, *args, **kwargs):
            if self.shuffle:  # the training loader
                reads.append("epoch")
                raise AssertionError("a data-free method read the training split")
            return real(self, *args, **kwargs)
        return epoch

    def take(self, *args, **kwargs):
        reads.append("take")
        raise AssertionError("a data-free method drew training samples")

    for cls in (loader_module.DeviceLoader, loader_module.StreamLoader):
        monkeypatch.setattr(cls, "epoch", guard(cls.epoch))
    monkeypatch.setattr(loader_module._Loader, "take", take)
    return reads


@pytest.fixture(scope="module")
def resnet8_checkpoint(tmp_path_factory):
    """A small resnet8 teacher for the 10-class synthetic data (untrained: the runs test plumbing)."""
    from kdbench.models import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet8.pt"
    torch.save({"model": create_model("resnet8", num_classes=10, input_shape=CIFAR).state_dict()}, path)
    return path


@pytest.mark.parametrize("name", DATA_FREE)
def test_a_data_free_run_never_reads_the_training_split_and_records_its_networks(
        name, run_job, resnet8_checkpoint, training_split_guard, tmp_path):
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet8", "student=resnet8", f"method={name}",
                     f"teacher.checkpoint={resnet8_checkpoint}", *TINY[name])
    assert training_split_guard == []
    assert record["status"] == "completed" and record["teacher_cache"] is False
    assert record["evaluated_network"] == "student" and record["training_data_read"] is False
    trained = record["networks_trained"]
    assert trained["student"] == record["student_params"]
    assert trained.get("generator", 0) == record["extra_params"]  # DeepInversion optimises images: no extra network
    assert (record["extra_params"] > 0) == (name in ("dafl", "dfad", "zskt"))
    assert len(record["history"]) == 1 and all(torch.isfinite(torch.tensor(v))
                                               for v in record["history"][0]["train"].values())
    saved = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert saved["n_test"] == 32  # evaluated on the real test split


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_generator_that_makes_a_batch_runs_at_the_runs_precision(precision, run_job, resnet8_checkpoint,
                                                                    monkeypatch):
    """DAFL makes its batches (G(z)) in batches(), outside the step: trainer.precision=bf16 must reach the generator
    too (it is most of a DAFL step's FLOPs), and fp32 must leave it in fp32."""
    from kdbench.methods.datafree import ConvGenerator

    seen, forward = [], ConvGenerator.forward

    def spy(self, z):
        seen.append(torch.is_autocast_enabled("cpu"))
        return forward(self, z)

    monkeypatch.setattr(ConvGenerator, "forward", spy)
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet8", "student=resnet8", "method=dafl",
                     f"teacher.checkpoint={resnet8_checkpoint}", *TINY["dafl"], f"trainer.precision={precision}")
    assert record["status"] == "completed" and seen and set(seen) == {precision == "bf16"}


@pytest.mark.slow
@pytest.mark.parametrize("student", ["resnet8x4", "wrn_16_2"])  # the benchmark pair, and across architectures
@pytest.mark.parametrize("name", DATA_FREE)
def test_a_data_free_run_distils_resnet32x4_into_the_benchmark_student_and_across_architectures(
        name, student, run_job, random_teacher_checkpoint, training_split_guard):
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet32x4", f"student={student}", f"method={name}",
                     f"teacher.checkpoint={random_teacher_checkpoint}", *TINY[name])
    assert record["status"] == "completed" and training_split_guard == []
    assert record["student"] == student and record["teacher"] == "resnet32x4"
    assert set(record["history"][0]["train"]) == {"loss", *EXPECTED_TERMS[name]}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dafl", "zskt"])
def test_an_interrupted_data_free_run_resumes_to_the_same_epochs_as_a_straight_one(
        name, run_job, resnet8_checkpoint, monkeypatch, tmp_path):
    """The generator, its BN statistics and its Adam moments are in the run checkpoint, and each epoch's latent codes
    come from (seed, epoch): a run interrupted after epoch 1 finishes exactly as an uninterrupted one."""
    import kdbench.job as job

    overrides = [*TINY_SYNTHETIC, "trainer.epochs=2", "teacher=resnet8", "student=resnet8", f"method={name}",
                 f"teacher.checkpoint={resnet8_checkpoint}", *TINY[name]]
    straight = run_job(*overrides, name="straight")
    real_evaluate, calls = job.evaluate, {"n": 0}

    def interrupt_in_epoch_2(model, loader, precision="fp32", logits_of=None):
        calls["n"] += 1
        if calls["n"] == 3:  # teacher eval, epoch 1, then Ctrl-C at epoch 2's evaluation
            raise KeyboardInterrupt
        return real_evaluate(model, loader, precision, logits_of)

    monkeypatch.setattr(job, "evaluate", interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_job(*overrides, name="resumed")
    monkeypatch.setattr(job, "evaluate", real_evaluate)
    resumed = run_job(*overrides, name="resumed")
    assert [h["train"] for h in resumed["history"]] == [h["train"] for h in straight["history"]]
    assert [h["test_top1"] for h in resumed["history"]] == [h["test_top1"] for h in straight["history"]]
    ckpt = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert ckpt["method"]["_extra_state"]["generator_optimizer"]["state"]
