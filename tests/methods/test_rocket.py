"""rocket (Rocket Launching, Zhou et al. AAAI 2018): a light net (the student) and a booster trained together, the
light net regressing the booster's logits behind a gradient block, the two sharing the light net's convs (interval
sharing); the loss against NumPy, the sharing, the wiring, the extra networks and one-epoch jobs."""
from __future__ import annotations

import pytest
import torch

from kdbench.distill import create_method, method_class
from kdbench.errors import IncompatibleModels, KDBenchError
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair
from tests.helpers import close, method_options, rand64
from tests.methods.online_helpers import SMALL_SYNTHETIC, assert_online_job, np_mean_ce

TERMS = {"ce", "booster_ce", "hint"}


def rocket_options(booster="resnet14", **options):
    return method_options("rocket", booster=booster, **options)


def test_rocket_loss_matches_numpy():
    from kdbench.methods.rocket import rocket_loss

    zl, zb, y = rand64(4, 5, seed=1, scale=2.0), rand64(4, 5, seed=2, scale=2.0), torch.tensor([1, 0, 4, 2])
    got = rocket_loss(zl, zb, y)
    a, b = zl.numpy(), zb.numpy()
    close(got["ce"], np_mean_ce(a, y))
    close(got["booster_ce"], np_mean_ce(b, y))
    close(got["hint"], sum(sum((b[i, c] - a[i, c]) ** 2 for c in range(5)) for i in range(4)) / 4)


@pytest.mark.parametrize("block", [True, False])
def test_the_gradient_block_keeps_the_hint_out_of_the_booster(block):
    from kdbench.methods.rocket import rocket_loss

    zl, zb = rand64(3, 4, seed=3).requires_grad_(True), rand64(3, 4, seed=4).requires_grad_(True)
    rocket_loss(zl, zb, torch.tensor([0, 1, 2]), gradient_block=block)["hint"].backward()
    assert zl.grad.abs().sum() > 0 and (zb.grad is None) == block


def test_interval_sharing_makes_the_boosters_first_blocks_compute_with_the_light_nets_convs():
    pair = make_pair(None, "wrn_16_1", num_classes=100, input_shape=(3, 32, 32))
    m = create_method(rocket_options("wrn_40_1"), pair)
    convs = {n for n, mod in pair.student.named_modules() if isinstance(mod, torch.nn.Conv2d)}
    assert set(m.shared) == convs and len(convs) == 15  # stem + 2 blocks x (2 convs) x 3 stages + 2 shortcuts
    # wrn_16_1's convs: stem 3*16*9, stage 1 four 16*16*9, stage 2 16*32*9 + 3 * 32*32*9 + 16*32, stage 3 alike x2
    shared = 432 + 4 * 2304 + (4608 + 3 * 9216 + 512) + (18432 + 3 * 36864 + 2048)
    assert m.shared_params == shared == 173_488
    assert count_parameters(m) == 569_780 - shared  # wrn_40_1 at 100 classes, its borrowed convs counted once
    assert not any(k.endswith("block1.layer.0.conv1.weight") for k in m.state_dict())
    assert any(k.endswith("block1.layer.2.conv1.weight") for k in m.state_dict())  # the booster's own third block
    x = torch.randn(2, 3, 32, 32)
    m.booster.eval()
    before = m.booster(x)
    with torch.no_grad():
        pair.student.block1.layer[0].conv1.weight.mul_(-1.0)
    assert not torch.allclose(before, m.booster(x))  # the booster reads the light net's weights


def test_the_boosters_loss_trains_the_shared_convs_and_the_hint_only_the_light_net():
    pair = make_pair(None, "resnet8")
    m = create_method(rocket_options(), pair)
    assert method_class("rocket").needs_teacher is False and m.booster_name == "resnet14"
    batch = make_batch(4, 10)
    terms = m.all_terms(batch, pair.student.forward_taps(batch.inputs, m.student_taps), None)
    assert set(terms) == TERMS
    terms["booster_ce"].backward(retain_graph=True)
    assert pair.student.layer1[0].conv1.weight.grad is not None  # shared: the booster's first block
    assert pair.student.fc.weight.grad is None and pair.student.layer1[0].bn1.weight.grad is None  # own BN, head
    pair.student.zero_grad(set_to_none=True)
    m.zero_grad(set_to_none=True)
    terms["hint"].backward()
    assert all(p.grad is None for p in m.parameters()) and pair.student.fc.weight.grad is not None
    m.eval()
    torch.testing.assert_close(m.extra_heads()["booster"](pair.student, batch.inputs), m.booster(batch.inputs))


def test_separate_networks_share_nothing():
    pair = make_pair(None, "vgg8", input_shape=(3, 32, 32))
    m = create_method(rocket_options("resnet32x4", share="none"), pair)
    assert m.shared == [] and count_parameters(m) == count_parameters(m.booster) > 7_000_000


def test_rocket_refuses_boosters_it_cannot_share_with():
    with pytest.raises(IncompatibleModels, match="method 'rocket' cannot distill None -> vgg8: .*booster of the light "
                                                 "net's family"):
        create_method(rocket_options("resnet32x4"), make_pair(None, "vgg8", input_shape=(3, 32, 32)))
    with pytest.raises(IncompatibleModels, match="no conv of the same name and shape"):
        create_method(rocket_options("wrn_40_2"), make_pair(None, "wrn_16_1"))
    with pytest.raises(KDBenchError, match="share must be one of"):
        create_method(rocket_options(share="bottom"), make_pair(None, "resnet8"))


def test_the_booster_is_the_teacher_model_config_of_the_run():
    from tests.conftest import method_config

    cfg = method_config("rocket", "teacher=wrn_40_1", "student=wrn_16_1")
    assert cfg.booster.name == "wrn_40_1"


def test_rocket_job_on_small_synthetic_data_records_the_booster_and_no_teacher(run_job, tmp_path):
    record = run_job(*SMALL_SYNTHETIC, "teacher=resnet14", "student=resnet8", "method=rocket")
    assert_online_job(record, tmp_path, "rocket", ["booster"], TERMS)
    assert record["online"]["booster"] == "resnet14" and record["online"]["shared_convs"] > 0
    assert "teacher_source" not in record


@pytest.mark.slow
@pytest.mark.parametrize("teacher, student, extra", [("resnet32x4", "resnet8x4", []),
                                                     ("resnet32x4", "vgg8", ["method.share=none"])])
def test_rocket_job_trains_the_benchmark_pair_shared_and_a_cross_family_pair_apart(run_job, tmp_path, teacher, student,
                                                                                  extra):
    record = run_job(*TINY_SYNTHETIC, f"teacher={teacher}", f"student={student}", "method=rocket", *extra)
    assert_online_job(record, tmp_path, "rocket", ["booster"], TERMS)
    state = torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)
    assert any(k.startswith("booster.") for k in state["method"])
