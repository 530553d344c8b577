"""Experiment configs: each composes, its sweep names existing options, the table experiments leave no published
cell without a job, and results/paper/*.csv is exactly what scripts/import_paper_numbers.py makes.

A job's cell is labels_of(its composed config), the key the leaderboard joins paper rows on; teacher rows come from
the teacher store, whose records are the labels of the jobs that train them (Job.teacher.job). Composition is the slow part (~0.1 s), so
configs are cached, seeds are left out (they change no label), and the large pair x method sweeps are composed once
per pair and once per method, then combined (two whole jobs per sweep check the combination).
"""
from __future__ import annotations

import itertools
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser

from kdbench.config import CONF_DIR
from kdbench.distill import method_class
from kdbench.job import labels_of, resolve
from kdbench.report import PAPER_DIR
from tests.conftest import REPO, compose_config

SRC = REPO.parent / "shared" / "reference" / "paper_numbers.csv"
EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
# Each paper file -> the experiments that together run its tables.
TABLES = {
    "Tian2020_CRD": ["crd_cifar100_same", "crd_cifar100_cross"],
    "Zhao2022_DKD": ["dkd_cifar100_same", "dkd_cifar100_cross", "imagenet_r34_r18", "imagenet_r50_mv1"],
    "Zhao2023_DOT": ["dot_cifar100", "dot_imagenet", "imagenet_r34_r18", "imagenet_r50_mv1"],
    "AT2017": ["at_cifar10_wrn", "at_imagenet"],
    "YimFSP2017": ["fsp_cifar10", "fsp_cifar100"],
    "TAKD2020": ["takd_cifar10", "takd_cifar100"],
    "Hinton2015": ["hinton_mnist", "hinton_mnist_no3", "hinton_mnist_only78"],
    "Sun2024_LSKD": ["lskd_cifar100_same", "lskd_cifar100_cross"],
    "Huang2022_DIST": ["dist_cifar100", "dist_imagenet"],
    "Zheng2024_TTM": ["ttm_cifar100_same", "ttm_cifar100_cross", "ttm_imagenet", "crd_imagenet", "imagenet_r34_r18",
                      "imagenet_r50_mv1", "dist_imagenet", "nkd_imagenet"],
    "Yang2023_NKD": ["nkd_imagenet", "uskd_imagenet"],  # ImageNet cells only (cls_KD has no CIFAR-100 table of kdbench pairs)
    "Zhou2021_WSLD": ["wsld_imagenet", "imagenet_teachers", "imagenet_r34_r18", "imagenet_r50_mv1"],  # ImageNet only
    "Xu2020_SSKD": ["sskd_cifar100"],
    "Jin2023_MLKD": ["mlkd_cifar100_same", "mlkd_cifar100_cross", "mlkd_cifar100_cross_960ep"],
    "Li2023_CTKD": ["ctkd_cifar100", "ctkd_cifar100_cross", "ctkd_imagenet", "imagenet_teachers"],
    # the LSKD paper's +LS rows of the plug-in methods (the KD+LS rows belong to the lskd method's own file)
    "Sun2024_LSKD_plugins": ["lskd_cifar100_dkd", "lskd_cifar100_mlkd", "lskd_cifar100_ctkd"],
    "Chen2022_SimKD": ["simkd_cifar100", "semckd_cifar100"],
    "Chen2021_SemCKD": ["semckd_cifar100"],
    "Liu2021_ICKD": ["ickd_cifar100"],
    "Miles2022_ITRD": ["itrd_cifar100_same", "itrd_cifar100_cross"],
    # the online methods' tables (one, ffl, ktg, rocket have experiments but no transcribed cell yet)
    "Chen2020_OKDDip": ["okddip_cifar100"],
    "Yun2020_CSKD": ["cs_kd_cifar100"],
    "Zhang2019_BYOT": ["byot_cifar100", "byot_cifar100_resnet50"],  # the exits' cells are the runs' head rows
    "Bagherinezhad2018_LabelRefinery": ["label_refinery_imagenet"],
    "Lee2019_MHGD": ["mhgd_cifar100"],
    "Shen2021_NetGraft": ["netgraft_cifar10", "netgraft_cifar10_5shot", "netgraft_cifar10_1shot", "netgraft_cifar100",
                          "netgraft_cifar100_5shot", "netgraft_cifar100_1shot"],
    "Liu2019_IRG": ["irg_cifar10_kdzoo", "irg_cifar100_kdzoo"],
    "Zhang2020_PAD": ["pad_imagenet"],  # torchdistill's two-stage reproduction; pad_imagenet is one stage
    "Chen2019_DAFL": ["dafl_mnist", "dafl_cifar10", "dafl_cifar100"],
    "Fang2019_DFAD": ["dfad_mnist", "dfad_cifar10", "dfad_cifar100"],
    "Micaelli2019_ZSKT": ["zskt_cifar10"],  # Figure 2's WRN-40-2 -> WRN-16-1 zero-shot point (Table 1 not read)
    "Yin2020_DeepInversion": ["deepinversion_cifar10"],  # the teacher only (Table 1 not read)
    "Wang2023_ND": ["nd_cifar100", "nd_imagenet"],
    "Miles2024_SRD": ["srd_cifar100", "srd_imagenet"],
    # the ImageNet tables (conf/experiment/*imagenet*.yaml)
    "Tian2020_CRD_imagenet": ["crd_imagenet", "imagenet_r34_r18"],
    "Heo2019_OFD": ["ofd_imagenet", "imagenet_teachers", "imagenet_r34_r18", "imagenet_r50_mv1"],
    "Yue2020_MGD": ["mgd_imagenet", "imagenet_teachers", "imagenet_r50_mv1"],
    "Chen2021_ReviewKD": ["imagenet_r34_r18", "imagenet_r50_mv1"],
}
# Data sets whose rows a paper CSV may carry before kdbench can run them (no conf/dataset/<name>.yaml yet): their cells
# are not required to have a job until the data set exists (ImageNet is another issue).
AWAITING_DATASETS = {"imagenet"} - {p.stem for p in (Path(CONF_DIR) / "dataset").glob("*.yaml")}
DERIVED = {"kd+bias3", "kd+bias78"}  # made from a sweep's records afterwards (python -m kdbench.bias), not by a job
# Published methods kdbench has no config for: their rows are kept for reference, no job produces them.
NO_KDBENCH_METHOD = {"dkd+ctkd": "CTKD's DKD at the learned temperature (zhengli97/CTKD distiller_zoo/DKD.py)"}
# Experiments whose students learn from the RepDistiller teachers: one stored teacher per architecture for all.
CIFAR100_BENCHMARK = ["crd_cifar100_same", "crd_cifar100_cross", "dkd_cifar100_same", "dkd_cifar100_cross",
                      "dot_cifar100", "sskd_cifar100", "mlkd_cifar100_same", "mlkd_cifar100_cross",
                      "mlkd_cifar100_cross_960ep", "ctkd_cifar100", "lskd_cifar100_dkd", "lskd_cifar100_mlkd",
                      "lskd_cifar100_ctkd", "simkd_cifar100", "semckd_cifar100", "ickd_cifar100",
                      "itrd_cifar100_same", "itrd_cifar100_cross", "nd_cifar100", "cat_kd_cifar100",
                      "ctkd_cifar100_cross", "srd_cifar100",
                      # multi-teacher: the first teacher of each ensemble (the others differ by seed or architecture)
                      "ae_kd_cifar100", "ae_kd_cifar100_resnet50", "meal_cifar100"]
FULL_PRODUCT_MAX = 6  # larger pair x method sweeps are composed per pair and per method


@lru_cache(maxsize=None)
def _compose(overrides: tuple[str, ...]):
    return compose_config(overrides)


def compose(*overrides: str):
    """compose_config, cached; the order of the overrides does not matter (each sets a different key)."""
    return _compose(tuple(sorted(overrides)))


@lru_cache(maxsize=None)
def _job(overrides: tuple[str, ...]):
    return resolve(_compose(overrides), overrides)


def job_of(*overrides: str):
    """The resolved job (with its teacher chain) of these overrides, cached like compose()."""
    return _job(tuple(sorted(overrides)))


@lru_cache(maxsize=None)
def sweep_axes(experiment: str) -> dict[str, list[str]]:
    """hydra.sweeper.params (the primary's merged with the experiment's) as key -> values, as the sweeper parses it."""
    params = compose_config([f"experiment={experiment}"], return_hydra_config=True).hydra.sweeper.params
    parser = OverridesParser.create()
    axes = {}
    for key, value in params.items():
        override = parser.parse_override(f"{key}={value}")
        axes[key] = list(override.sweep_string_iterator()) if override.is_sweep_override() \
            else [override.get_value_element_as_str()]
    return axes


def needs_teacher(cfg) -> bool:
    return method_class(cfg.method.name).needs_teacher


def cell(labels: dict) -> tuple:
    return labels["dataset"], labels["teacher"] or "", labels["student"], labels["method"]


def stored_teachers(job):
    """(the job that trains it, its store entry) for every teacher the job trains into the store, TA chains included."""
    while job.teacher is not None and job.teacher.job is not None:
        yield job.teacher.job, job.teacher.entry
        job = job.teacher.job


def is_large(experiment: str) -> bool:
    axes = {k: v for k, v in sweep_axes(experiment).items() if k != "seed"}
    return set(axes) == {"pair", "method"} and len(axes["pair"]) * len(axes["method"]) > FULL_PRODUCT_MAX


def shortcut_cell(experiment: str, pair: str, method: str) -> tuple:
    """A job's cell from its pair's labels (composed with the sweep's first method that uses a teacher) and its
    method's (composed alone): n_pairs + n_methods compositions instead of n_pairs * n_methods."""
    teaching = next(m for m in sweep_axes(experiment)["method"] if needs_teacher(compose(f"method={m}")))
    pair_labels = labels_of(compose(f"experiment={experiment}", f"pair={pair}", f"method={teaching}"))
    method_labels = labels_of(compose(f"method={method}"))
    return (pair_labels["dataset"], pair_labels["teacher"] if method_labels["teacher"] else "", pair_labels["student"],
            method_labels["method"])


def head_cells(job) -> set:
    """The cells of the job's extra heads (exits, aggregated predictions: their own records, method `<label>@<head>`),
    from the method built on untrained models of the job's pair, as the job checks its pair before training."""
    from kdbench.distill import Method, create_method
    from kdbench.job import _pair

    if method_class(job.method.name).extra_heads is Method.extra_heads:
        return set()
    shape, classes = tuple(job.dataset.image_shape), int(job.dataset.num_classes)
    with torch.random.fork_rng(devices=[]):
        teachers = [spec.model.build(classes, shape) for spec in job.teachers]
        method = create_method(job.method, _pair(job, job.student.build(classes, shape), teachers, shape, classes,
                                                 torch.arange(2 * classes) % classes))
    dataset, teacher, student, label = cell(job.labels)
    return {(dataset, teacher, student, f"{label}@{name}") for name in method.extra_heads()}


@lru_cache(maxsize=None)
def jobs(experiment: str) -> tuple[list, frozenset]:
    """(resolved jobs that hold every job's stored teachers, the cells of all jobs and their heads); seeds change
    neither."""
    axes = {k: v for k, v in sweep_axes(experiment).items() if k != "seed"}
    base = f"experiment={experiment}"
    if not is_large(experiment):
        resolved = [job_of(base, *(f"{k}={v}" for k, v in zip(axes, combo))) for combo in itertools.product(*axes.values())]
        return resolved, frozenset(cell(job.labels) for job in resolved).union(*(head_cells(job) for job in resolved))
    cells = frozenset(shortcut_cell(experiment, p, m) for p, m in itertools.product(axes["pair"], axes["method"]))
    teaching = next(m for m in axes["method"] if needs_teacher(compose(f"method={m}")))
    return [job_of(base, f"pair={p}", f"method={teaching}") for p in axes["pair"]], cells


@lru_cache(maxsize=None)
def cells_of(experiment: str) -> frozenset:
    """Every cell recorded by the experiment's jobs and by the teachers they train into the store."""
    resolved, cells = jobs(experiment)
    return cells | {cell(tjob.labels) for job in resolved for tjob, _ in stored_teachers(job)}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_as_its_first_job(experiment):
    axes = {k: v for k, v in sweep_axes(experiment).items() if k != "seed"}  # the seed changes nothing composed
    cfg = compose(f"experiment={experiment}", *(f"{k}={v[0]}" for k, v in axes.items()))
    assert cfg.dataset.name and cfg.student.label and cfg.method.name
    assert labels_of(cfg)["dataset"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_sweep_names_existing_options(experiment):
    for key, values in sweep_axes(experiment).items():
        group = Path(CONF_DIR) / key
        if key == "seed":
            assert all(v.isdigit() for v in values), f"{experiment}: seed values {values}"
        else:
            assert group.is_dir(), f"{experiment} sweeps '{key}', which is not a config group"
            missing = [v for v in values if not (group / f"{v}.yaml").exists()]
            assert not missing, f"{experiment}: no conf/{key}/ option(s) {missing}"
        assert len(set(values)) == len(values), f"{experiment}: '{key}' lists a value twice"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_an_experiment_that_picks_its_method_also_sweeps_it(experiment):
    """An experiment's `override /method: m` is replaced by the primary config's sweep axis (vanilla,kd) in a
    multirun unless the experiment's own sweep names the method too (zskt_cifar10 once ran vanilla and kd)."""
    text = (Path(CONF_DIR) / "experiment" / f"{experiment}.yaml").read_text()
    picked = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.strip().startswith("- override /method:")]
    if picked:
        assert picked[0] in sweep_axes(experiment)["method"], \
            f"{experiment} picks method {picked[0]} but its sweep runs {sweep_axes(experiment)['method']}"


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if is_large(e)])
def test_large_sweep_shortcut_matches_full_composition(experiment):
    """jobs()'s shortcut gives the cell that composing the whole job gives (first and last job of the sweep)."""
    pairs, methods = sweep_axes(experiment)["pair"], sweep_axes(experiment)["method"]
    for pair, method in [(pairs[0], methods[0]), (pairs[-1], methods[-1])]:
        full = compose(f"experiment={experiment}", f"pair={pair}", f"method={method}")
        assert cell(labels_of(full)) == shortcut_cell(experiment, pair, method)


def test_every_paper_file_has_its_experiments():
    assert sorted(p.stem for p in PAPER_DIR.glob("*.csv")) == sorted(TABLES)
    assert all(e in EXPERIMENTS for experiments in TABLES.values() for e in experiments)


@pytest.mark.parametrize("paper", sorted(TABLES))
def test_every_paper_cell_has_a_job(paper):
    rows = pd.read_csv(PAPER_DIR / f"{paper}.csv", dtype=str, keep_default_na=False)
    wanted = {(r.dataset, r.teacher, r.student, r.method) for r in rows.itertuples()
              if r.method not in DERIVED | NO_KDBENCH_METHOD.keys() and r.dataset not in AWAITING_DATASETS}
    produced = set().union(*(cells_of(e) for e in TABLES[paper]))
    missing = sorted(wanted - produced)
    assert not missing, f"{paper}: no job of {TABLES[paper]} produces {missing}"
    for experiment in TABLES[paper]:
        assert cells_of(experiment) & wanted, f"{experiment} produces none of {paper}'s cells"


@pytest.mark.parametrize("paper", sorted(TABLES))
def test_paper_rows_name_the_experiments_that_run_their_recipe(paper):
    """The report compares a paper row only with runs of the experiments it names: they exist and include the table's."""
    rows = pd.read_csv(PAPER_DIR / f"{paper}.csv", dtype=str, keep_default_na=False)
    named = {e for value in rows["experiments"] for e in value.split()}
    assert set(TABLES[paper]) <= named and named <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", sorted({e for es in TABLES.values() for e in es}))
def test_each_teacher_is_trained_once_per_experiment(experiment):
    """One store key per teacher label: e.g. a mobile student's lr 0.01 must not leak into its teacher's recipe."""
    keys = {}
    for job in jobs(experiment)[0]:
        for tjob, key in stored_teachers(job):
            keys.setdefault(tjob.student.label, set()).add(key)
    assert {t: k for t, k in keys.items() if len(k) > 1} == {}


def test_cifar100_benchmark_experiments_share_their_teachers():
    keys = {}
    for experiment in CIFAR100_BENCHMARK:
        for job in jobs(experiment)[0]:
            for tjob, key in stored_teachers(job):
                keys.setdefault(tjob.student.label, set()).add(key)
    assert {"resnet32x4", "vgg13", "wrn_40_2", "ResNet50"} <= keys.keys()
    assert {t: k for t, k in keys.items() if len(k) > 1} == {}


def test_pair_sets_mobile_lr_and_dkd_beta():
    job = job_of("experiment=dkd_cifar100_cross", "pair=vgg13-MobileNetV2", "method=kd")
    assert job.optim.lr == 0.01 and job.teacher.job.optim.lr == 0.05
    cfg = compose("experiment=dkd_cifar100_same", "pair=vgg13-vgg8", "method=dkd_per_pair")
    assert cfg.method.weights.nckd == 6.0 and labels_of(cfg)["method"] == "dkd"
    job = job_of("experiment=dot_cifar100", "pair=resnet32x4-ShuffleV2", "method=kd", "optim=dot")
    assert (job.optim.name, job.optim.lr, job.labels["method"]) == ("dot", 0.01, "kd+dot")
    assert job.teacher.job.optim.name == "sgd"


@pytest.mark.skipif(not SRC.exists(), reason=f"reference table {SRC} not available")
def test_import_script_is_deterministic_and_matches_results(tmp_path):
    for out in ("a", "b"):
        subprocess.run([sys.executable, "scripts/import_paper_numbers.py", str(SRC), "--out", str(tmp_path / out)],
                       cwd=REPO, check=True, capture_output=True)
    made = sorted(p.name for p in (tmp_path / "a").glob("*.csv"))
    # the papers in the shared reference table; the others' CSVs are written by hand from the papers (source column)
    assert set(made) <= {p.name for p in PAPER_DIR.glob("*.csv")} and len(made) >= 7
    for name in made:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes() == (PAPER_DIR / name).read_bytes(), name


def test_hinton_no3_and_only78_reuse_the_hinton_teachers():
    """The no-3s and 7s-and-8s students learn from the teachers hinton_mnist stored (trained on all ten digits)."""
    for seed in ("1", "2"):
        keys = [job_of(f"experiment={e}", "method=kd", f"seed={seed}").teacher.entry
                for e in ("hinton_mnist", "hinton_mnist_no3", "hinton_mnist_only78")]
        assert keys[0] == keys[1] == keys[2]
    assert keys[0] != job_of("experiment=hinton_mnist", "method=kd", "seed=1").teacher.entry
