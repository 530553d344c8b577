"""The ImageNet tables: every ImageNet experiment's jobs build their method on the real pair (torchvision / mdistiller
models, 1000 classes, 224x224 taps), plan with a cost and no data (`dry_run=true` needs no ImageNet on disk), and carry
the ImageNet settings of the code they reproduce; the ImageNet paper rows are well-formed.

The models are built once per module (a ResNet-50 forward at 224x224 costs ~4 GFLOPs per image); the methods are
built on those models' probed shapes, as kdbench.job.check_pair builds them before a run.
"""
from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch

from kdbench.config import CONF_DIR
from kdbench.distill import PairInfo, create_method
from kdbench.models import count_parameters, create_model, probe_taps
from kdbench.plan import plan_job
from kdbench.report import PAPER_DIR
from tests.conftest import KDBENCH, compose_config, resolve_job
from tests.test_experiments import NO_KDBENCH_METHOD, TABLES, job_of, sweep_axes

IMAGENET_TRAIN = 1_281_167
NO_DATA = Path(tempfile.gettempdir()) / "kdbench-test-no-imagenet-here"  # a data dir that must never be created
SHAPE = (3, 224, 224)
# experiment -> jobs its sweep lists (seeds included)
JOBS = {
    "imagenet_r34_r18": 21, "imagenet_r50_mv1": 21, "dot_imagenet": 2, "at_imagenet": 2, "crd_imagenet": 2,
    "ofd_imagenet": 1, "imagenet_teachers": 2, "dist_imagenet": 8, "ctkd_imagenet": 4, "nkd_imagenet": 2,
    "uskd_imagenet": 4, "wsld_imagenet": 2, "ttm_imagenet": 2, "nd_imagenet": 3, "srd_imagenet": 1,
    "label_refinery_imagenet": 6, "pad_imagenet": 1, "mgd_imagenet": 1,
}
# experiments that train their teacher into the store (the others distil from torchvision's pretrained weights)
STORE_TEACHERS = {"label_refinery_imagenet": 1}  # the refinery: a ResNet-50 trained with standard labels
IMAGENET_MODELS = ("tv_resnet18", "tv_resnet34", "tv_resnet50", "mobilenet_v1", "tv_mobilenet_v2")


def test_every_imagenet_experiment_is_listed_here_and_in_a_paper_table():
    from omegaconf import OmegaConf

    def dataset(path):
        defaults = OmegaConf.to_container(OmegaConf.load(path)).get("defaults", [])
        return next((d["override /dataset"] for d in defaults if isinstance(d, dict) and "override /dataset" in d), None)

    found = {p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml") if dataset(p) == "imagenet"}
    assert found == set(JOBS)
    assert set(JOBS) <= {e for experiments in TABLES.values() for e in experiments}


def combos(experiment: str, seeds: bool = True) -> list[list[str]]:
    """The sweep's jobs as override lists (seeds=False: one per pair and method; the seed changes no setting)."""
    axes = {k: v for k, v in sweep_axes(experiment).items() if seeds or k != "seed"}
    return [[f"experiment={experiment}", *(f"{k}={v}" for k, v in zip(axes, values))]
            for values in itertools.product(*axes.values())]


@pytest.fixture(scope="module")
def imagenet_models():
    """name -> (model with 1000 classes, its probed 224x224 tap shapes), built once."""
    torch.manual_seed(0)
    built = {}
    for name in IMAGENET_MODELS:
        model = create_model(name, num_classes=1000, input_shape=SHAPE)
        with torch.no_grad():
            built[name] = (model, probe_taps(model, SHAPE))
    return built


def imagenet_pair(job, imagenet_models) -> PairInfo:
    student, s_shapes = imagenet_models[job.student.name]
    teacher, t_shapes = imagenet_models[job.teacher.model.name] if job.teacher is not None else (None, None)
    return PairInfo(student, teacher, s_shapes, t_shapes, job.student.label, job.labels["teacher"], 1000,
                    torch.arange(2000) % 1000, job.trainer.epochs, job.optim.lr, SHAPE, tuple(job.dataset.mean),
                    tuple(job.dataset.std), job.seed)


# The two mdistiller tables run by default; the other experiments' jobs with the slow tests (>10 s together).
MAIN = ("imagenet_r34_r18", "imagenet_r50_mv1")


@pytest.mark.parametrize("experiment", [e if e in MAIN else pytest.param(e, marks=pytest.mark.slow) for e in sorted(JOBS)])
def test_each_imagenet_job_builds_its_method_on_the_real_pair(experiment, imagenet_models):
    """Every (pair, method) of the sweep: the method is built on the probed 224x224 shapes of the 1000-class
    models (heads sized from them), and every tap it reads is one the models produce."""
    seen = 0
    for overrides in combos(experiment, seeds=False):
        job = job_of(*overrides, f"paths.data_dir={NO_DATA}")
        seen += 1
        pair = imagenet_pair(job, imagenet_models)
        method = create_method(job.method, pair)
        assert set(method.student_taps) <= set(pair.student_shapes), (experiment, job.labels)
        if pair.teacher is not None and method.needs_teacher:
            assert set(method.teacher_taps) <= set(pair.teacher_shapes), (experiment, job.labels)
            if experiment in STORE_TEACHERS:  # the teacher is trained into the store by a vanilla job
                assert job.teacher.pretrained is None and job.teacher.job.labels["method"] == "vanilla"
            else:
                assert job.teacher.pretrained == "IMAGENET1K_V1" and job.teacher.job is None  # no teacher trained
    assert seen


@pytest.mark.parametrize("experiment", sorted(JOBS))
def test_imagenet_dry_run_plans_each_job_with_a_cost_and_touches_no_data(experiment):
    """What `kdbench experiment=<x> dry_run=true` prints per job: ImageNet's 1,281,167 training images, the
    epochs, FLOPs > 0 and a pretrained teacher (none trained first; Label Refinery's is trained into the store), planned
    with no data directory."""
    assert not NO_DATA.exists()
    assert len(combos(experiment)) == JOBS[experiment]
    plans = [plan_job(job_of(*o, f"paths.data_dir={NO_DATA}")) for o in combos(experiment, seeds=False)]
    for plan in plans:
        assert plan["labels"]["dataset"] == "imagenet" and plan["samples"] == IMAGENET_TRAIN
        assert plan["flops"] > 0 and plan["epochs"] >= 100
        for teacher in plan["teachers"]:
            if experiment in STORE_TEACHERS:
                assert teacher["source"] == "train" and not teacher.get("weights")  # not in the store yet: trained first
                continue
            assert teacher["source"] == "pretrained" and teacher["weights"] == "IMAGENET1K_V1"
            assert not teacher["cached"]  # augmented inputs: the teacher runs every epoch
    assert not NO_DATA.exists()


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(JOBS))
def test_cli_imagenet_dry_run_lists_the_jobs_with_no_data(experiment, tmp_path):
    import subprocess

    env = {**os.environ, "KDBENCH_RESULTS": str(tmp_path), "KDBENCH_DATA": str(tmp_path / "no-data")}
    out = subprocess.run([*KDBENCH, f"experiment={experiment}", "dry_run=true"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    trained = STORE_TEACHERS.get(experiment, 0)
    assert f"dry run: {JOBS[experiment]} jobs, {trained} teacher(s) to train first, total " in out.stdout
    assert out.stdout.count(" imagenet | ") == JOBS[experiment]
    assert not (tmp_path / "no-data").exists() and not list(tmp_path.rglob("metrics.json"))


# ----------------------------------------------------------------------------- the ImageNet settings


def job(*overrides):
    return resolve_job(list(overrides))


@pytest.mark.parametrize("pair,expected", [
    # mdistiller configs/imagenet/<pair>/{kd,at,crd,reviewkd,dkd,ofd}.yaml SOLVER: BATCH_SIZE, LR
    ("r34_r18", {"vanilla": (256, 0.1), "kd_in1k": (512, 0.2), "at": (512, 0.2), "crd": (256, 0.1),
                 "reviewkd_in1k": (256, 0.1), "dkd_in1k": (512, 0.2), "ofd_in1k": (256, 0.1)}),
    ("r50_mv1", {"vanilla": (256, 0.1), "kd_in1k": (512, 0.2), "at": (512, 0.2), "crd": (256, 0.1),
                 "reviewkd_in1k": (256, 0.1), "dkd_in1k": (512, 0.2), "ofd_in1k": (128, 0.05)}),
])
def test_mdistiller_experiments_take_each_methods_batch_and_lr_from_its_config(pair, expected):
    for method, (batch, lr) in expected.items():
        j = job(f"experiment=imagenet_{pair}", f"method={method}")
        assert (j.trainer.batch_size, j.optim.lr) == (batch, lr), method
        assert (j.trainer.epochs, list(j.schedule.milestones), j.optim.weight_decay) == (100, [30, 60, 90], 1e-4)


@pytest.mark.parametrize("pair,values", [
    ("tv_resnet34-tv_resnet18", {"nckd": 0.5, "reviewkd": 1.0, "mid": 512, "levels": None}),
    ("tv_resnet50-mobilenet_v1", {"nckd": 2.0, "reviewkd": 8.0, "mid": 256, "levels": 3}),
])
def test_per_pair_imagenet_options_are_the_codes(pair, values):
    """DKD beta (mdistiller dkd.yaml BETA), ReviewKD weight (REVIEWKD_WEIGHT) and ABF middle width (the authors'
    build_review_kd), OFD levels (mdistiller: 3 for ResNet-50 -> MobileNet-V1)."""
    dkd = job("dataset=imagenet", f"pair={pair}", "method=dkd_in1k").method
    assert (dkd.weights["nckd"], dkd.weights["tckd"], dkd.temperature, dkd.warmup_epochs) == (values["nckd"], 1.0, 1.0, 1)
    rkd = job("dataset=imagenet", f"pair={pair}", "method=reviewkd_in1k").method
    assert (rkd.weights["reviewkd"], rkd.max_mid_channel, rkd.student_preact) == (values["reviewkd"], values["mid"], True)
    ofd = job("dataset=imagenet", f"pair={pair}", "method=ofd_in1k").method
    assert (ofd.levels, ofd.weights["ofd"]) == (values["levels"], 1e-4)


def test_dot_experiment_is_mdistillers_dot_config():
    j = job("experiment=dot_imagenet", "pair=tv_resnet34-tv_resnet18", "method=kd_in1k")
    assert (j.optim.name, j.optim.lr, j.optim.delta, j.optim.momentum, j.optim.weight_decay) == ("dot", 0.2, 0.09, 0.9, 1e-4)
    assert j.trainer.batch_size == 512 and j.labels["method"] == "kd+dot"
    assert (j.method.temperature, dict(j.method.weights)) == (1.0, {"ce": 0.5, "kd": 0.5})


def test_authors_recipes_of_the_single_paper_experiments():
    ofd = job("experiment=ofd_imagenet", "pair=tv_resnet50-mobilenet_v1")  # lr 0.1 * 0.1^(epoch // 30), 1-indexed: first drop at epoch 30
    assert list(ofd.schedule.milestones) == [29, 59, 89] and ofd.method.levels is None and ofd.teacher_train_mode
    mgd = job("experiment=mgd_imagenet", "pair=tv_resnet50-mobilenet_v1")  # main_mgd.py --epochs 120 --warmup 1: 130, drops 41/71/91
    assert (mgd.trainer.epochs, mgd.trainer.batch_size, mgd.optim.lr, mgd.optim.nesterov) == (130, 256, 0.1, True)
    assert list(mgd.schedule.milestones) == [41, 71, 91] and (mgd.method.reducer, mgd.method.update_freq) == ("amp", 1)
    assert dict(mgd.method.weights) == {"ce": 1.0, "mgd": 1e-4} and not mgd.teacher_train_mode
    wsld = job("experiment=wsld_imagenet", "pair=tv_resnet34-tv_resnet18")
    assert (wsld.trainer.epochs, wsld.optim.nesterov, wsld.teacher_train_mode) == (101, True, True)
    assert (wsld.method.temperature, dict(wsld.method.weights)) == (2.0, {"ce": 1.0, "wsld": 2.5})
    ctkd = job("experiment=ctkd_imagenet", "pair=tv_resnet34-tv_resnet18", "method=ctkd_in1k")
    assert ctkd.trainer.epochs == 120 and ctkd.method.lambda_loops == 5 and dict(ctkd.method.weights)["kd"] == 1.0
    nd = job("experiment=nd_imagenet", "pair=tv_resnet34-tv_resnet18", "method=kd_nd")
    assert (nd.trainer.batch_size, nd.optim.lr, nd.optim.nesterov) == (512, 0.2, True)
    assert (nd.method.temperature, nd.method.warmup_epochs, dict(nd.method.weights)) == (1.0, 5, {"ce": 1.0, "kd": 2.5, "nd": 1.0})
    mv2 = job("experiment=uskd_imagenet", "pair=none-tv_mobilenet_v2")  # mmcls: 300 epochs, lr 0.045 x0.98 per epoch
    assert (mv2.trainer.epochs, mv2.optim.lr, mv2.optim.weight_decay, mv2.schedule.gamma) == (300, 0.045, 4e-5, 0.98)
    assert list(mv2.schedule.milestones) == list(range(1, 300))


# ----------------------------------------------------------------------------- method layouts on the real shapes


def test_reviewkd_abf_layout_on_imagenet_pairs_is_the_reference_config(imagenet_models):
    """mdistiller configs/imagenet/*/reviewkd.yaml IN_CHANNELS / OUT_CHANNELS / SHAPES, derived from the probed taps."""
    for pair_name, c_in, c_out, mid in [("tv_resnet34-tv_resnet18", [64, 128, 256, 512, 512], [64, 128, 256, 512, 512], 512),
                                        ("tv_resnet50-mobilenet_v1", [128, 256, 512, 1024, 1024],
                                         [256, 512, 1024, 2048, 2048], 256)]:
        j = job("dataset=imagenet", f"pair={pair_name}", "method=reviewkd_in1k")
        m = create_method(j.method, imagenet_pair(j, imagenet_models))
        shallow_first = list(m.abfs)[::-1]
        assert [a.conv1[0].in_channels for a in shallow_first] == c_in
        assert [a.conv2[0].out_channels for a in shallow_first] == c_out
        assert {a.conv1[0].out_channels for a in shallow_first} == {mid}
        assert m.out_sizes == [(56, 56), (28, 28), (14, 14), (7, 7), (1, 1)]  # SHAPES / OUT_SHAPES [1, 7, 14, 28, 56]


def test_ofd_on_resnet50_mobilenet_v1_connects_the_deepest_three_stages(imagenet_models):
    """mdistiller's OFD for this pair: connectors 256->512, 512->1024, 1024->2048 (conv 1x1 + BN), margins from the
    last BN of ResNet-50 layer2..4; its extra parameters counted independently."""
    j = job("dataset=imagenet", "pair=tv_resnet50-mobilenet_v1", "method=ofd_in1k")
    pair = imagenet_pair(j, imagenet_models)
    m = create_method(j.method, pair)
    assert m.student_taps == m.teacher_taps == ("stage2_pre", "stage3_pre", "stage4_pre")
    assert [(c[0].in_channels, c[0].out_channels) for c in m.connectors] == [(256, 512), (512, 1024), (1024, 2048)]
    assert count_parameters(m) == sum(s * t + 2 * t for s, t in [(256, 512), (512, 1024), (1024, 2048)])
    teacher = pair.teacher
    assert [mg.numel() for mg in m.margins] == [512, 1024, 2048]
    from kdbench.methods.ofd import ofd_margin
    assert torch.equal(m.margins[0], ofd_margin(teacher.layer2[-1].bn3.weight, teacher.layer2[-1].bn3.bias))


# ----------------------------------------------------------------------------- the paper rows


def imagenet_rows() -> pd.DataFrame:
    frames = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in sorted(PAPER_DIR.glob("*.csv"))]
    rows = pd.concat(frames, ignore_index=True)
    return rows[rows["dataset"] == "imagenet"]


def test_imagenet_paper_rows_name_kdbench_models_metrics_and_an_experiment():
    from kdbench.models import list_models

    rows = imagenet_rows()
    assert len(rows) >= 60
    models = set(list_models())
    assert set(rows["student"]) <= models and set(rows["teacher"]) - {""} <= models
    assert set(rows["metric"]) == {"top1", "top5"}
    assert rows["value"].astype(float).between(50, 100).all()
    assert set(rows["protocol"]) <= {"best", "last"}
    runnable = rows[~rows["method"].isin(NO_KDBENCH_METHOD)]
    assert (runnable["experiments"] != "").all()
    assert set(rows[rows["teacher"] == ""]["method"]) <= {"vanilla", "uskd"}  # teacher rows and teacher-free methods


def test_error_tables_become_accuracies():
    """AT / OFD report top-1 and top-5 error: value = 100 - error, and the note says so."""
    rows = imagenet_rows()
    for paper, cell, metric, value in [("AT2017", ("tv_resnet34", "at"), "top1", 70.70),
                                       ("AT2017", ("", "vanilla"), "top5", 89.20),
                                       ("Heo2019_OFD", ("tv_resnet50", "ofd"), "top1", 71.25),
                                       ("Heo2019_OFD", ("tv_resnet50", "ofd"), "top5", 90.34)]:
        row = rows[(rows["paper"] == paper) & (rows["teacher"] == cell[0]) & (rows["method"] == cell[1])
                   & (rows["metric"] == metric)]
        assert len(row) == 1 and float(row["value"].iloc[0]) == pytest.approx(value)
        assert "100 - error" in row["note"].iloc[0]


def test_methods_without_a_kdbench_config_have_none():
    labels = set()
    for path in (Path(CONF_DIR) / "method").glob("*.yaml"):
        text = path.read_text()
        labels |= {line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(("label:", "name:"))}
    assert not set(NO_KDBENCH_METHOD) & labels


# ----------------------------------------------------------------------------- smoke runs (synthetic, CIFAR-shaped)


@pytest.fixture(scope="module")
def random_tv_checkpoints(tmp_path_factory):
    """Untrained 10-class teacher checkpoints of the ImageNet teachers (smoke runs test plumbing, not accuracy)."""
    folder = tmp_path_factory.mktemp("tv_teachers")
    paths = {}
    for name in ("tv_resnet34", "tv_resnet50"):
        torch.manual_seed(0)
        paths[name] = folder / f"{name}.pt"
        torch.save({"model": create_model(name, num_classes=10, input_shape=(3, 32, 32)).state_dict()}, paths[name])
    return paths


@pytest.mark.parametrize("pair,method,terms", [
    ("tv_resnet34-tv_resnet18", "reviewkd_in1k", {"ce", "reviewkd"}),
    ("tv_resnet50-mobilenet_v1", "ofd_in1k", {"ce", "ofd"}),
    ("tv_resnet50-mobilenet_v1", "dkd_in1k", {"ce", "tckd", "nckd"}),
])
def test_imagenet_methods_train_end_to_end_on_torchvision_pairs(run_job, random_tv_checkpoints, pair, method, terms):
    """One synthetic epoch through the pre-activation taps of the torchvision teachers (OFD: teacher in train mode,
    ReviewKD: student pre-activations too), gradients and the record."""
    from tests.conftest import TINY_SYNTHETIC

    teacher = pair.split("-")[0]
    record = run_job(*TINY_SYNTHETIC, f"pair={pair}", f"method={method}", "teacher.weights=null",
                     f"teacher.checkpoint={random_tv_checkpoints[teacher]}")
    assert record["status"] == "completed" and record["method"] == method.split("_in1k")[0]
    assert set(record["history"][0]["train"]) == {"loss", *terms}
    assert all(torch.isfinite(torch.tensor(v)) for v in record["history"][0]["train"].values())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["reviewkd_in1k", "ofd_in1k"])
def test_imagenet_variants_train_on_the_cifar_benchmark_pair(run_job, random_teacher_checkpoint, method):
    from tests.conftest import TINY_SYNTHETIC

    record = run_job(*TINY_SYNTHETIC, "teacher=resnet32x4", "student=resnet8x4", f"method={method}",
                     f"teacher.checkpoint={random_teacher_checkpoint}")
    assert record["status"] == "completed" and record["extra_params"] > 0
