"""Contracts every method keeps, checked in tables over the methods: configs compose with documented keys, methods
build on real model pairs and give finite weighted terms, extra parameters match reference/methods.md §3.4, no
gradient reaches the teacher, pairs a method cannot serve fail at construction; and (slow) one-epoch jobs for every
method on resnet32x4 -> resnet8x4 and on the cross-architecture pair vgg13 -> MobileNetV2."""
from __future__ import annotations

import pytest
import torch

from kdbench.config import CONF_DIR
from kdbench.distill import create_method, list_methods, method_class
from kdbench.errors import IncompatibleModels
from kdbench.models import count_parameters, create_model
from tests.conftest import REPO, TINY_SYNTHETIC, compose_config, make_batch, make_pair
from tests.methods.datafree_helpers import TINY
from tests.helpers import assert_no_teacher_grad, forward, method_options

# The seed papers' methods (issue 4) and the RepDistiller/mdistiller benchmark feature methods.
SEED_METHODS = ("logit_l2", "cond_ts", "ft", "darkrank", "fsp", "at", "fitnet")
BENCHMARK_METHODS = ["sp", "cc", "vid", "rkd", "pkt", "nst", "crd", "crd_kd", "dkd", "kdsvd", "ab", "ofd", "reviewkd"]

SMALL = (3, 16, 16)  # CIFAR ResNets run on 16x16 inputs too (maps 16/8/4): cheaper forwards for the deep pair
DIGITS = dict(num_classes=10, input_shape=(1, 8, 8))  # the scikit-learn digits pair mlp_1200x2 -> mlp_32


# ----------------------------------------------------------------------------- configs


def test_seed_method_configs_compose_with_documented_keys():
    for name in SEED_METHODS:
        cfg = compose_config([f"method={name}"]).method
        assert cfg.name == name
        text = (CONF_DIR / "method" / f"{name}.yaml").read_text()
        for key in cfg:
            if key != "name":
                assert f"{key}:" in text
        for term in cfg.weights:
            line = next(l for l in text.splitlines() if l.strip().startswith(f"{term}:"))
            assert "#" in line, f"{name}: weight '{term}' is undocumented"


# ----------------------------------------------------------------------------- methods on real pairs

SEED_VARIANTS = [(name, {}) for name in SEED_METHODS] + [
    ("ft", {"variant": "paper"}), ("fsp", {"protocol": "paper"}), ("darkrank", {"mode": "soft"}),
    ("darkrank", {"hard_top_k": 4}), ("logit_l2", {"reduction": "paper"}), ("cond_ts", {"soft_loss": "kl"}),
    ("fitnet", {"hint_layer": "stage3"})]


@pytest.mark.parametrize("name, options", SEED_VARIANTS)
def test_seed_methods_give_finite_terms_named_by_their_weights_on_resnet32x4_to_resnet8x4(benchmark_pair, name,
                                                                                             options):
    pair = benchmark_pair
    cfg = method_options(name, **options)
    method = create_method(cfg, pair)
    s_out, t_out = forward(pair, method)
    batch = make_batch(2, 100, indices=[3, 7])
    total, terms = method.loss(batch, s_out, t_out, epoch=1)
    assert set(terms) == set(cfg.weights) and all(torch.isfinite(v) for v in terms.values())
    if total.requires_grad:
        assert_no_teacher_grad(total, *t_out.values())


def test_seed_feature_methods_run_on_the_same_width_pair_resnet56_to_resnet20():
    pair = make_pair("resnet56", "resnet20", num_classes=100, input_shape=SMALL)
    for name in ("at", "fitnet", "fsp", "ft"):
        method = create_method(method_options(name), pair)
        s_out, t_out = forward(pair, method, shape=SMALL)
        method.loss(make_batch(2, 100, SMALL), s_out, t_out, 1)


@pytest.mark.parametrize("name", ["logit_l2", "cond_ts", "darkrank", "kd"])
def test_logit_methods_distill_an_mlp_pair_without_teacher_gradient(name):
    pair = make_pair("mlp_1200x2", "mlp_32", **DIGITS)
    method = create_method(method_options(name), pair)
    s_out, t_out = forward(pair, method, n=6, shape=(1, 8, 8))
    total, terms = method.loss(make_batch(6, 10, (1, 8, 8)), s_out, t_out, 1)
    assert torch.isfinite(total)
    assert_no_teacher_grad(total, *t_out.values())


@pytest.mark.parametrize("name", ["at", "fsp", "ft", "fitnet"])
def test_feature_methods_refuse_an_mlp_pair(name):
    pair = make_pair("mlp_1200x2", "mlp_32", **DIGITS)
    with pytest.raises(IncompatibleModels, match=f"method '{name}' cannot distill mlp_1200x2 -> mlp_32"):
        create_method(method_options(name), pair)


@pytest.fixture(scope="module")
def small_pair():
    return make_pair("resnet14", "resnet8", num_classes=10, input_shape=(3, 16, 16), n_train=40)


@pytest.mark.parametrize("name", BENCHMARK_METHODS)
def test_no_gradient_reaches_the_teacher(small_pair, name):
    pair = small_pair
    method = create_method(method_options(name), pair)
    stages = method.stages(pair.student, pair.teacher)
    batch = make_batch(6, 10, indices=[0, 7, 13, 21, 30, 39])
    pair.teacher.train(method.teacher_train_mode)
    pair.teacher.requires_grad_(True)
    pair.teacher.zero_grad(set_to_none=True)
    pair.student.zero_grad(set_to_none=True)
    if stages:  # AB: the distillation happens in the stage
        s_taps, t_taps = stages[0].student_taps, stages[0].teacher_taps
        loss_fn = lambda s, t: stages[0].loss(batch, s, t)  # noqa: E731
    else:
        s_taps, t_taps = method.student_taps, method.teacher_taps
        loss_fn = lambda s, t: sum(v for k, v in method.all_terms(batch, s, t).items() if k != "ce")  # noqa: E731
    t_out = pair.teacher.forward_taps(batch.inputs, t_taps)  # with grad enabled, to catch any leak
    s_out = pair.student.forward_taps(batch.inputs, s_taps)
    loss = loss_fn(s_out, t_out)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in pair.teacher.parameters()), f"{name} sent gradient into the teacher"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pair.student.parameters())
    total, terms = method.loss(batch, pair.student.forward_taps(batch.inputs, method.student_taps),
                               pair.teacher.forward_taps(batch.inputs, method.teacher_taps), 20)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
    pair.teacher.requires_grad_(False)


# ----------------------------------------------------------------------------- extra parameters (methods.md §3.4)

EXTRA_PARAMS = {  # reference/methods.md §3.4, resnet32x4 -> resnet8x4, 100 classes
    "sp": 0, "rkd": 0, "pkt": 0, "nst": 0, "dkd": 0, "kdsvd": 0, "ab": 0,
    "cc": 65_792, "crd": 65_792, "crd_kd": 65_792, "vid": 258_496, "ofd": 86_912, "reviewkd": 1_808_774,
}


@pytest.mark.parametrize("name", BENCHMARK_METHODS)
def test_extra_parameters_match_reference(benchmark_pair, name):
    assert count_parameters(create_method(method_options(name), benchmark_pair)) == EXTRA_PARAMS[name]


def test_parameter_free_seed_methods_add_no_parameters_to_resnet32x4_to_resnet8x4(benchmark_pair):
    for name in ("at", "fsp", "logit_l2", "cond_ts", "darkrank"):
        assert count_parameters(create_method(method_options(name), benchmark_pair)) == 0


def test_extra_parameters_resnet56_to_resnet20():
    pair = make_pair("resnet56", "resnet20", num_classes=100, input_shape=(3, 32, 32), n_train=200)
    counts = {name: count_parameters(create_method(method_options(name), pair)) for name in ("cc", "crd", "vid", "ofd", "ab")}
    vid_md = count_parameters(create_method(method_options("vid", fixed_variance=True), pair))
    assert counts == {"cc": 16_640, "crd": 16_640, "vid": 16_240, "ofd": 5_600, "ab": 0} and vid_md == 16_128


OTHER_PAIRS = {  # reference/methods.md §3.4 (RD modules; "vid_md" = mdistiller's fixed variance, MD OFD)
    ("wrn_40_2", "wrn_16_2"): {"cc": 33_024, "crd": 33_024, "vid": 64_736, "vid_md": 64_512, "ab": 0, "ofd": 21_952},
    ("wrn_40_2", "wrn_40_1"): {"cc": 24_832, "vid": 53_984, "ab": 11_424},
    ("vgg13", "vgg8"): {"cc": 131_328, "vid": 1_820_032, "vid_md": 1_818_624, "ab": 0, "ofd": 609_024},
    ("vgg13", "MobileNetV2"): {"cc": 229_632, "vid": 1_325_952, "ab": 1_345_152},
    ("resnet32x4", "ShuffleV2"): {"cc": 164_096, "vid": 328_384, "ab": 2_495_808},
}


@pytest.mark.parametrize("teacher,student", list(OTHER_PAIRS))
def test_extra_parameters_other_benchmark_pairs(teacher, student):
    from kdbench.models import list_models

    missing = {teacher, student} - set(list_models())
    if missing:
        pytest.skip(f"model(s) {sorted(missing)} not registered")
    pair = make_pair(teacher, student, num_classes=100, input_shape=(3, 32, 32), n_train=200)
    got = {}
    for key in OTHER_PAIRS[(teacher, student)]:
        cfg = method_options("vid", fixed_variance=True) if key == "vid_md" else method_options(key)
        got[key] = count_parameters(create_method(cfg, pair))
    assert got == OTHER_PAIRS[(teacher, student)]


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("name, extra", [("logit_l2", []), ("cond_ts", []), ("darkrank", []),
                                         ("darkrank", ["method.mode=soft"])])
def test_logit_methods_train_a_digits_job(run_job_shared_teachers, name, extra):
    record = run_job_shared_teachers("teacher=mlp_1200x2", "student=mlp_32", f"method={name}", "trainer.epochs=1",
                                     "trainer.progress=false", *extra)
    assert record["status"] == "completed" and record["teacher"] == "mlp_1200x2"
    assert set(record["history"][0]["train"]) == {"loss", *method_options(name).weights}


@pytest.mark.slow
@pytest.mark.parametrize("name", SEED_METHODS)
def test_seed_method_jobs_run_resnet32x4_to_resnet8x4_with_their_stages(run_job_shared_teachers, tmp_path, name):
    extra = ["method.stage_epochs=1"] if name in ("ft", "fsp") else []
    if name == "ft":
        # The 1-epoch synthetic teacher's eval-mode BN has unconverged running stats, so its stage3 map is ~1e2 in
        # scale (MSE ~7e4) and RD's 0.01 LR blows the paraphraser up in a few steps; the plumbing is what is tested.
        extra.append("method.stage_lr=1e-6")
    record = run_job_shared_teachers(*TINY_SYNTHETIC, "teacher=resnet32x4", "student=resnet8x4", f"method={name}",
                                     *extra)
    assert record["status"] == "completed" and len(record["history"]) == 1
    assert set(record["history"][0]["train"]) == {"loss", *method_options(name).weights}
    ckpt = torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)
    expected_stages = {"ft": ["paraphraser"], "fsp": ["fsp"]}.get(name, [])
    assert ckpt["stages_done"] == expected_stages
    assert record["extra_params"] == {"fitnet": 16_768, "ft": 2_065_536 + 1_033_728}.get(name, 0)


SMOKE_TERMS = {
    "sp": {"ce", "sp"}, "cc": {"ce", "cc"}, "vid": {"ce", "vid"}, "rkd": {"ce", "rkd_distance", "rkd_angle"},
    "pkt": {"ce", "pkt"}, "nst": {"ce", "nst"}, "crd": {"ce", "crd"}, "crd_kd": {"ce", "kd", "crd"},
    "dkd": {"ce", "tckd", "nckd"}, "kdsvd": {"ce", "kdsvd"}, "ab": {"ce"}, "ofd": {"ce", "ofd"},
    "reviewkd": {"ce", "reviewkd"},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARK_METHODS)
def test_benchmark_method_jobs_run_resnet32x4_to_resnet8x4(run_job, random_teacher_checkpoint, tmp_path, name):
    extra = ["method.stage_epochs=1"] if name == "ab" else []
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet32x4", "student=resnet8x4", f"method={name}",
                     f"teacher.checkpoint={random_teacher_checkpoint}", *extra)
    assert record["status"] == "completed"
    assert record["method"] == name
    assert len(record["history"]) == 1 and 0 <= record["last_top1"] <= 100
    assert set(record["history"][0]["train"]) == {"loss"} | SMOKE_TERMS[name]
    assert record["extra_params"] == EXTRA_PARAMS[name]
    if name == "ab":  # the pre-training stage ran before the main epoch
        assert torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)["stages_done"] == ["ab_init"]


# ----------------------------------------------------------------------------- cross-architecture pair (slow)
# Every method on vgg13 -> MobileNetV2 (synthetic CIFAR-shaped data, 1 epoch, stages included): it trains, or it
# refuses with IncompatibleModels before training, as the references cannot serve it.

# Methods the references cannot run on this pair: KDSVD compares singular vectors of equal widths, FSP needs equal
# widths, OFD and ReviewKD need pre-activation features MobileNetV2 does not define (mdistiller cannot either).
CROSS_ARCH_REFUSES = {"kdsvd", "fsp", "ofd", "reviewkd",
                     # CAT-KD needs the map MobileNetV2 pools (after its conv2, no tap); ReviewKD++ is reviewkd's
                     "cat_kd", "reviewkd_nd",
                     # ONE, OKDDip and FFL branch off the student's last stage (MobileNetV2 has none to cut off:
                     # method.share=none serves it in okddip and ffl); Rocket's interval sharing needs a booster of the
                     # light net's family (method.share=none serves it)
                     "one", "okddip", "ffl", "rocket",
                     # BYOT's bottleneck doubles a stage's width up to the pooled width: MobileNetV2's 12 -> 1280 cannot
                     "byot",
                     # MobileNetV2 has no pre-activation taps (MGD, FSKD), other widths than vgg13 (MHGD compares
                     # singular vectors over channels) and is no VGG (NetGraft grafts VGG blocks)
                     "mgd", "fskd", "mhgd", "netgraft"}
NO_TEACHER = {"vanilla", "dml", "tf_kd", "uskd", "one", "okddip", "ffl", "ktg", "rocket", "cs_kd", "byot", "sla_sd",
              "multi_exit"}
STAGE_OPTIONS = {"ab": ["method.stage_epochs=1"], "fsp": ["method.stage_epochs=1"],
                 # an untrained teacher's last map is ~1e2 in scale: a tiny paraphraser LR keeps the stage finite
                 "ft": ["method.stage_epochs=1", "method.stage_lr=1e-6"],
                 "sskd": ["method.stage_epochs=1"],
                 # an untrained teacher has pooled channels that are 0 on every image: ITRD's batch std needs an eps
                 "itrd": ["method.std_eps=1e-6"],
                 "tofd": ["method.stage_epochs=1"],
                 # a checkpoint teacher keeps no training route: RCO distils from it alone
                 "rco": ["method.require_anchors=false"],
                 # the data-free methods' epochs are their own iterations of generated batches: tiny ones here
                 **TINY}
CROSS_ARCH_PAIR = {"tf_kd_self": ("MobileNetV2", "MobileNetV2"), "ban": ("MobileNetV2", "MobileNetV2")}


@pytest.fixture(scope="module")
def cross_arch_checkpoints(tmp_path_factory):
    """Untrained vgg13 and MobileNetV2 checkpoints for the 10-class synthetic data (built in that order, seed 0)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("teachers")
    paths = {}
    for arch in ("vgg13", "MobileNetV2"):
        paths[arch] = root / f"{arch}.pt"
        torch.save({"model": create_model(arch, num_classes=10, input_shape=(3, 32, 32)).state_dict()}, paths[arch])
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted({m for m in list_methods() if not m.startswith("test_")} | {"crd_kd", "ban"}))
def test_every_method_trains_or_refuses_the_cross_architecture_pair(run_job, cross_arch_checkpoints, method):
    teacher, student = CROSS_ARCH_PAIR.get(method, ("vgg13", "MobileNetV2"))
    overrides = [*TINY_SYNTHETIC, f"teacher={teacher}", f"student={student}", f"method={method}",
                 f"teacher.checkpoint={cross_arch_checkpoints[teacher]}", *STAGE_OPTIONS.get(method, [])]
    class_name = {"crd_kd": "crd", "ban": "tf_kd_self"}.get(method, method)  # config names of another class's
    if method_class(class_name).multi_teacher:  # kd_avg, ae_kd, meal: an ensemble of the pair's two architectures
        overrides = [o for o in overrides if not o.startswith("teacher")] + [
            f"+teacher@teachers.a={teacher}", f"teachers.a.checkpoint={cross_arch_checkpoints[teacher]}",
            "+teacher@teachers.b=MobileNetV2", f"teachers.b.checkpoint={cross_arch_checkpoints['MobileNetV2']}"]
    if method in CROSS_ARCH_REFUSES:
        with pytest.raises(IncompatibleModels, match=method):
            run_job(*overrides)
        return
    record = run_job(*overrides)
    assert record["status"] == "completed" and len(record["history"]) == 1
    assert (record["teacher"] is None) == (method in NO_TEACHER)
