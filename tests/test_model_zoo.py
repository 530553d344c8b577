"""Model zoo: parameter counts and feature shapes of methods.md §3.2, the tap API, reference-checkpoint loading.

Shape and key checks run on the meta device (no memory, no compute), so they cover every model in the default
suite; real forward/backward passes use a batch of 2 and are marked slow for models above ~5M parameters.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from kdbench.errors import CorruptCheckpoint, IncompatibleModels, UnknownName
from kdbench.models import count_parameters, create_model, list_models, load_reference_checkpoint, probe_taps

REPO = Path(__file__).resolve().parents[1]
REFERENCE_KEYS = REPO.parent / "shared" / "reference" / "reference_state_dict_keys.json"

# methods.md §3.2 (100 classes); torchvision: the documented 1000-class counts with a 100-way head
# (resnet18 11,689,512; resnet34 21,797,672; resnet50 25,557,032; mobilenet_v2 3,504,872).
PARAMS_100 = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756, "resnet44": 667_188,
    # not in §3.2 (FSP's and TAKD's ResNet-26): each step of 6 in depth adds one BasicBlock per stage, +97,216
    "resnet26": 278_324 + 97_216,
    "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692,
    "ResNet50": 23_705_252, "ResNet18": 11_220_132, "MobileNetV2": 812_836, "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
    # not in §3.2: the data-free papers' CIFAR ResNet-34 (kuangliu's 21,282,122 at 10 classes, + 90 * 513 here)
    "ResNet34": 21_328_292,
    "tv_resnet18": 11_689_512 - 512 * 900 - 900, "tv_resnet34": 21_797_672 - 512 * 900 - 900,
    "tv_resnet50": 25_557_032 - 2048 * 900 - 900, "tv_mobilenet_v2": 3_504_872 - 1280 * 900 - 900,
}
TV_PARAMS_1000 = {"tv_resnet18": 11_689_512, "tv_resnet34": 21_797_672, "tv_resnet50": 25_557_032,
                  "tv_mobilenet_v2": 3_504_872}

# methods.md §3.2: RepDistiller's `feat` list for 32x32 inputs, mapped onto tap names.
_R = [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]
_RX4 = [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)]
_WRN2 = [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,)]
_VGG = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4), (512,)]
FEATS = {
    **{f"resnet{d}": _R for d in (8, 14, 20, 26, 32, 44, 56, 110)},
    "resnet8x4": _RX4, "resnet32x4": _RX4,
    "wrn_16_1": _R, "wrn_40_1": _R, "wrn_16_2": _WRN2, "wrn_40_2": _WRN2,
    **{f"vgg{d}": _VGG for d in (8, 11, 13, 16, 19)},
    "ResNet50": [(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4), (2048,)],
    "ResNet18": [(64, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512,)],
    "ResNet34": [(64, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512,)],
    "MobileNetV2": [(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2), (1280,)],
    "ShuffleV1": [(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4), (960,)],
    "ShuffleV2": [(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4), (1024,)],
}
FOUR_STAGES = {"ResNet50", "ResNet18", "ResNet34", "MobileNetV2", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19"}
NO_PRE = {"MobileNetV2"}  # §3.3: no preact defined
BN_NOT_IMPLEMENTED = {"ShuffleV1", "ShuffleV2", "lenet5", "lenet5_half", "mlp", "mlp_32", "mlp_1200x2", "mlp_800x2"}
BIG = {name for name, n in PARAMS_100.items() if n > 5_000_000}

ALL = [name for name in list_models() if name != "probe_net"]  # kdbench's zoo, not the tests' model


def input_shape(name: str) -> tuple[int, int, int]:
    return (1, 28, 28) if name.startswith(("mlp", "lenet")) else (3, 32, 32)


def meta_model(name: str, num_classes: int = 100):
    with torch.device("meta"):
        return create_model(name, num_classes=num_classes, input_shape=input_shape(name))


def slow_if_big(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in names]


def test_zoo_has_every_benchmark_architecture():
    expected = set(PARAMS_100) | {f"plain_cnn_{s}{v}" for s in (2, 4, 6, 8, 10) for v in ("", "_c100")}
    assert expected <= set(ALL)


# ---------------------------------------------------------------- parameter counts and shapes (meta device)

@pytest.mark.parametrize("name", sorted(PARAMS_100))
def test_parameter_count_matches_reference(name):
    assert count_parameters(meta_model(name)) == PARAMS_100[name]


@pytest.mark.parametrize("name", sorted(TV_PARAMS_1000))
def test_torchvision_parameter_count_1000_classes(name):
    assert count_parameters(meta_model(name, num_classes=1000)) == TV_PARAMS_1000[name]


@pytest.mark.parametrize("name", sorted(FEATS))
def test_tap_shapes_match_reference_feats(name):
    model = meta_model(name)
    names = ["stem", *model.stage_names, "embedding"]
    assert len(model.stage_names) == (4 if name in FOUR_STAGES else 3)
    shapes = probe_taps(model, input_shape(name))
    assert [shapes[t] for t in names] == FEATS[name]
    assert shapes["logits"] == (100,)
    if name not in NO_PRE:  # a preact has its stage's shape
        assert all(shapes[f"{s}_pre"] == shapes[s] for s in model.stage_names)


@pytest.mark.parametrize("name", ALL)
def test_tap_declarations_are_consistent(name):
    model = meta_model(name)
    taps = model.tap_names
    assert len(set(taps)) == len(taps) and taps[-1] == "logits" and "embedding" in taps
    assert model.stage_names and all(s in taps for s in model.stage_names)
    for tap in taps:
        if tap.endswith("_pre"):
            assert tap[:-4] in model.stage_names
    shapes = probe_taps(model, input_shape(name))  # every declared tap is produced
    assert set(shapes) == set(taps) and shapes["logits"] == (100,)
    assert shapes["embedding"] == (model_embedding_width(model, shapes),)


def model_embedding_width(model, shapes) -> int:
    """The classifier's input width (the embedding must be what the last Linear consumes)."""
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return last_linear.in_features


@pytest.mark.parametrize("name", ALL)
def test_unknown_tap_lists_the_taps(name):
    model = meta_model(name)
    with pytest.raises(UnknownName) as err:
        model.forward_taps(torch.zeros(2, *input_shape(name), device="meta"), ["stage9", "logits"])
    assert "stage9" in str(err.value) and all(t in str(err.value) for t in model.tap_names)


def test_unknown_model_lists_the_models():
    with pytest.raises(UnknownName) as err:
        create_model("resnet9000", num_classes=10, input_shape=(3, 32, 32))
    message = str(err.value)
    assert "resnet9000" in message and all(n in message for n in ("wrn_40_2", "vgg13", "ShuffleV2", "tv_resnet18"))


# ---------------------------------------------------------------- bn_before_relu (§3.3)

@pytest.mark.parametrize("name", ALL)
def test_bn_before_relu(name):
    model = meta_model(name)
    if name in BN_NOT_IMPLEMENTED:
        with pytest.raises(NotImplementedError):
            model.bn_before_relu()
        return
    bns = model.bn_before_relu()
    assert len(bns) == len(model.stage_names) and all(isinstance(b, nn.BatchNorm2d) for b in bns)
    shapes = probe_taps(model, input_shape(name), model.stage_names)
    assert [b.num_features for b in bns] == [shapes[s][0] for s in model.stage_names]


def test_bn_before_relu_modules_are_the_reference_ones():
    wrn, vgg, r50, mbv2 = (meta_model(n) for n in ("wrn_40_2", "vgg13", "ResNet50", "MobileNetV2"))
    assert wrn.bn_before_relu() == [wrn.block2.layer[0].bn1, wrn.block3.layer[0].bn1, wrn.bn1]
    assert vgg.bn_before_relu() == [vgg.block1[-1], vgg.block2[-1], vgg.block3[-1], vgg.block4[-1]]
    assert r50.bn_before_relu() == [r50.layer1[-1].bn3, r50.layer2[-1].bn3, r50.layer3[-1].bn3, r50.layer4[-1].bn3]
    assert mbv2.bn_before_relu() == [mbv2.blocks[i][-1].conv[-1] for i in (1, 2, 4, 6)]


# ---------------------------------------------------------------- real forward / backward (CPU, batch 2)

@pytest.mark.parametrize("name", slow_if_big(ALL))
def test_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, input_shape=input_shape(name)).train()
    x = torch.randn(2, *input_shape(name))
    out = model.forward_taps(x, model.tap_names)
    assert set(model.tap_names) <= set(out) and out["logits"].shape == (2, 10)
    loss = F.cross_entropy(out["logits"], torch.tensor([0, 1])) + sum(v.float().pow(2).mean() for v in out.values())
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model.forward_taps(x)["logits"])


SMALL_PRE = ["resnet8", "wrn_16_2", "vgg8", "ShuffleV1", "ShuffleV2", "plain_cnn_4", "plain_cnn_6_c100"]


@pytest.mark.parametrize("name", SMALL_PRE + [pytest.param("ResNet50", marks=pytest.mark.slow)])
def test_pre_taps_are_the_stage_before_its_activation(name):
    """§3.3: stage = ReLU(stage_pre) for post-activation nets; WRN's preact is the next BN of the raw stage."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, input_shape=input_shape(name)).eval()
    with torch.no_grad():
        out = model.forward_taps(torch.randn(2, *input_shape(name)), model.tap_names)
        for i, stage in enumerate(model.stage_names):
            pre = out[f"{stage}_pre"]
            if name.startswith("wrn"):
                assert torch.allclose(pre, model.bn_before_relu()[i](out[stage]))
            elif name == "ShuffleV2":
                half = pre.shape[1] // 2
                shuffle = getattr(model, f"layer{i + 1}")[-1].shuffle
                assert torch.equal(shuffle(torch.cat([pre[:, :half], F.relu(pre[:, half:])], 1)), out[stage])
            else:
                assert torch.equal(F.relu(pre), out[stage])
                assert not torch.equal(pre, out[stage])  # pre has negative entries


def test_wrn_pre_taps_call_bn_only_when_requested():
    model = create_model("wrn_16_1", num_classes=10, input_shape=(3, 32, 32)).train()
    bn = model.block2.layer[0].bn1
    x = torch.randn(2, 3, 32, 32)
    before = int(bn.num_batches_tracked)
    model.forward_taps(x, ["stage1", "stage2", "stage3"])
    assert int(bn.num_batches_tracked) == before + 1
    model.forward_taps(x, ["stage1_pre"])
    assert int(bn.num_batches_tracked) == before + 3  # RepDistiller's second call when preact is requested


def test_mobilenetv2_prints_nothing(capsys):
    create_model("MobileNetV2", num_classes=100, input_shape=(3, 32, 32))
    assert capsys.readouterr().out == ""


def test_takd_books_and_names():
    from kdbench.models.takd_cnn import CIFAR10_BOOK, CIFAR100_BOOK

    assert CIFAR10_BOOK[10][-2:] == ["FC128", "FC10"] and CIFAR100_BOOK[10][-2:] == ["FC512", "FC100"]
    m = meta_model("plain_cnn_10_c100")
    assert [mod.out_features for mod in m.fc_layers if isinstance(mod, nn.Linear)] == [512, 100]
    m = meta_model("plain_cnn_2", num_classes=10)
    convs = [mod for mod in m.conv_layers if isinstance(mod, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16] and m.fc_layers[-1].in_features == 16 * 8 * 8
    assert sorted(m.state_dict())[:3] == ["conv_layers.0.bias", "conv_layers.0.weight", "conv_layers.1.bias"]


# ---------------------------------------------------------------- torchvision wrappers

@pytest.mark.parametrize("name", ["tv_resnet18", "tv_mobilenet_v2"])
def test_torchvision_keys_are_torchvision_keys(name):
    import torchvision

    with torch.device("meta"):
        tv = getattr(torchvision.models, name[3:])(num_classes=100)
    assert list(meta_model(name).state_dict()) == list(tv.state_dict())


def test_torchvision_weights_are_passed_through(monkeypatch):
    import torchvision

    seen = {}
    original = torchvision.models.resnet18

    def fake(weights=None, **kwargs):
        seen["weights"] = weights
        return original(weights=None, **kwargs)

    monkeypatch.setattr(torchvision.models, "resnet18", fake)
    with torch.device("meta"):
        create_model("tv_resnet18", num_classes=10, input_shape=(3, 32, 32))
        assert seen["weights"] is None
        create_model("tv_resnet18", num_classes=10, input_shape=(3, 32, 32), weights="IMAGENET1K_V1")
    assert seen["weights"] == "IMAGENET1K_V1"


def test_torchvision_wrapper_copies_and_mode_switches():
    model = create_model("tv_resnet18", num_classes=10, input_shape=(3, 32, 32))
    clone = copy.deepcopy(model)
    assert clone._net.fc is clone.fc and clone.fc is not model.fc
    with torch.no_grad():
        clone.fc.weight.zero_()
        clone.fc.bias.fill_(1.0)
    x = torch.randn(2, 3, 32, 32)
    clone.eval()
    assert not clone._net.training and not clone.layer1.training
    with torch.no_grad():
        assert torch.equal(clone(x), torch.ones(2, 10))
        out = model.eval().forward_taps(x, ["embedding", "stage4"])
        assert torch.allclose(out["logits"], model.fc(out["embedding"]))
        assert torch.allclose(out["embedding"], out["stage4"].mean((2, 3)))
    assert not model.layer1._forward_hooks and not model.fc._forward_pre_hooks  # hooks removed after the call
    model.double()  # conversions reach the network torchvision's forward runs
    assert model(x.double()).dtype == torch.float64


# ---------------------------------------------------------------- reference checkpoints

REFERENCE = json.loads(REFERENCE_KEYS.read_text()) if REFERENCE_KEYS.exists() else {}
needs_reference = pytest.mark.skipif(not REFERENCE, reason=f"{REFERENCE_KEYS} not present")


def synthetic_reference_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the reference definition's keys and shapes."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in REFERENCE[name]:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.randint(0, 10_000, tuple(shape), generator=gen)
        else:
            state[key] = torch.randn(tuple(shape), generator=gen)
    return state


@needs_reference
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_state_dict_keys_and_shapes_equal_reference(name):
    ours = {k: list(v.shape) for k, v in meta_model(name).state_dict().items()}
    assert list(ours.items()) == [(k, s) for k, s in REFERENCE[name]]


@needs_reference
@pytest.mark.parametrize("name", slow_if_big(sorted(REFERENCE)))
def test_load_reference_checkpoint(name):
    state = synthetic_reference_state(name)
    prefixed = name in ("resnet8", "wrn_16_1", "MobileNetV2")  # some reference files were saved from DataParallel
    checkpoint = {"model": {("module." + k if prefixed else k): v for k, v in state.items()}, "epoch": 240,
                  "accuracy": 70.0}
    model = create_model(name, num_classes=100, input_shape=(3, 32, 32))
    assert load_reference_checkpoint(model, checkpoint) is model
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    # the tensors drive the forward: a known parameter is where the reference keeps it
    if name.startswith("vgg"):
        assert torch.equal(model.classifier.weight, state["classifier.weight"])
    elif name in ("ResNet50", "ShuffleV1", "ShuffleV2"):
        assert torch.equal(model.linear.weight, state["linear.weight"])
    elif name == "MobileNetV2":
        assert torch.equal(model.classifier[0].weight, state["classifier.0.weight"])
    else:
        assert torch.equal(model.fc.weight, state["fc.weight"])


@needs_reference
def test_load_reference_checkpoint_from_file_and_old_format(tmp_path):
    state = synthetic_reference_state("wrn_16_2", seed=1)
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # PyTorch < 0.4.1 files
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": old, "epoch": 240}, path)
    model = load_reference_checkpoint(create_model("wrn_16_2", num_classes=100, input_shape=(3, 32, 32)), path)
    assert torch.equal(model.block1.layer[0].conv1.weight, state["block1.layer.0.conv1.weight"])


@needs_reference
def test_load_reference_checkpoint_errors(tmp_path):
    model = create_model("resnet8", num_classes=100, input_shape=(3, 32, 32))
    state = synthetic_reference_state("resnet8")
    with pytest.raises(IncompatibleModels, match="missing.*fc.bias"):
        load_reference_checkpoint(model, {"model": {k: v for k, v in state.items() if k != "fc.bias"}})
    with pytest.raises(IncompatibleModels, match="unexpected.*extra.weight"):
        load_reference_checkpoint(model, {"model": {**state, "extra.weight": torch.zeros(1)}})
    with pytest.raises(IncompatibleModels, match="fc.weight"):  # wrong number of classes
        ten_classes = {"fc.weight": torch.zeros(10, 64), "fc.bias": torch.zeros(10)}
        load_reference_checkpoint(model, {"model": {**state, **ten_classes}})
    with pytest.raises(IncompatibleModels):  # a different architecture
        load_reference_checkpoint(model, {"model": synthetic_reference_state("wrn_16_1")})
    with pytest.raises(CorruptCheckpoint):
        load_reference_checkpoint(model, {"epoch": 240})
    other = create_model("resnet8", num_classes=100, input_shape=(3, 32, 32))
    load_reference_checkpoint(model, {"model": other})  # a pickled network: its state dict is used
    assert torch.equal(model.fc.weight, other.fc.weight)
    with pytest.raises(CorruptCheckpoint):
        load_reference_checkpoint(model, tmp_path / "missing.pth")


# ---------------------------------------------------------------- configs and docs

def test_every_model_is_a_teacher_and_a_student_option_with_its_keyword_defaults():
    from tests.conftest import compose_config

    for name in ALL:
        cfg = compose_config([f"teacher={name}", f"student={name}"])
        assert cfg.teacher.model.name == cfg.student.model.name == name
        assert cfg.teacher.label == cfg.student.label == name
    cfg = compose_config(["student=mlp_32", "teacher=tv_resnet18"])
    assert list(cfg.student.model.hidden) == [32] and cfg.teacher.model.weights is None


def test_tap_table_lists_every_model():
    text = (REPO / "docs" / "taps.md").read_text()
    assert all(f"| `{name}` |" in text for name in ALL)


# ---------------------------------------------------------------- torch.compile

@pytest.mark.slow
def test_torch_compile_forward_taps():
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, input_shape=(3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    taps = ("stem", "stage3", "stage3_pre", "embedding")
    compiled = torch.compile(model.forward_taps)
    with torch.no_grad():
        eager, out = model.forward_taps(x, taps), compiled(x, taps)
    for tap in (*taps, "logits"):
        assert torch.allclose(out[tap], eager[tap], atol=1e-5), tap


@pytest.mark.parametrize("student,teacher", [("wrn_16_2", "wrn_40_2"), ("tv_resnet18", "tv_resnet34")])
def test_configs_compose(student, teacher):
    from tests.conftest import compose_config

    cfg = compose_config([f"student={student}", f"teacher={teacher}"])
    assert cfg.student.model.name == student and cfg.teacher.model.name == teacher
    assert cfg.teacher.checkpoint is None and cfg.teacher.label == teacher


def test_mobilenet_v1_is_the_imagenet_kd_papers_one():
    """ResNet-50 -> MobileNet-V1 (CRD, ReviewKD, DKD on ImageNet): mdistiller's network, its module names and size."""
    model = create_model("mobilenet_v1", num_classes=1000, input_shape=(3, 224, 224))
    assert count_parameters(model) == 4_231_976
    keys = list(model.state_dict())
    assert keys[0] == "model.0.0.weight" and keys[-2:] == ["fc.weight", "fc.bias"] and len(keys) == 164
    shapes = probe_taps(model, (3, 224, 224))
    assert [shapes[f"stage{i}"] for i in range(1, 5)] == [(128, 56, 56), (256, 28, 28), (512, 14, 14), (1024, 7, 7)]
    assert [bn.num_features for bn in model.bn_before_relu()] == [128, 256, 512, 1024]


@pytest.mark.parametrize("name", ["tv_resnet18", "tv_resnet50"])
def test_torchvision_resnet_pre_taps_are_the_last_blocks_residual_sum_before_its_relu(name):
    """stageN_pre = bn_last(...) + identity of layerN's last block, recomputed here block by block from torchvision's
    modules (BasicBlock: conv1-bn1-relu-conv2-bn2; Bottleneck: + conv3-bn3), and stageN = ReLU(stageN_pre); the tap
    carries the gradient of that sum, and its hooks are gone after the call."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, input_shape=(3, 64, 64)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model.forward_taps(x, model.tap_names)
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for i in range(1, 5):
            layer = getattr(model, f"layer{i}")
            for block in layer[:-1]:
                h = block(h)
            last = layer[-1]
            identity = last.downsample(h) if last.downsample is not None else h
            y = F.relu(last.bn1(last.conv1(h)))
            y = last.bn2(last.conv2(y))
            if hasattr(last, "bn3"):
                y = last.bn3(last.conv3(F.relu(y)))
            pre = y + identity
            torch.testing.assert_close(out[f"stage{i}_pre"], pre)
            assert torch.equal(F.relu(out[f"stage{i}_pre"]), out[f"stage{i}"]) and bool((pre < 0).any())
            h = F.relu(pre)
    assert not any(m._forward_pre_hooks for m in model.modules())
    # the gradient of a loss on the pre tap reaches the input as the recomputed sum's does
    xg = x.clone().requires_grad_(True)
    model.forward_taps(xg, ["stage2_pre"])["stage2_pre"].square().sum().backward()
    xr = x.clone().requires_grad_(True)
    h = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(xr)))))
    last = model.layer2[-1]
    for block in model.layer2[:-1]:
        h = block(h)
    identity = last.downsample(h) if last.downsample is not None else h
    y = last.bn2(last.conv2(F.relu(last.bn1(last.conv1(h)))))
    if hasattr(last, "bn3"):
        y = last.bn3(last.conv3(F.relu(y)))
    (y + identity).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)


def test_torchvision_resnet_bn_before_relu_is_the_last_bn_before_each_pre_tap():
    model = meta_model("tv_resnet34", num_classes=1000)
    assert [bn.num_features for bn in model.bn_before_relu()] == [64, 128, 256, 512]
    assert model.bn_before_relu()[3] is model.layer4[-1].bn2
    assert {f"stage{i}_pre" for i in range(1, 5)} <= set(model.tap_names)
