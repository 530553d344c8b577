"""A discoverable CLI, through the real entry point: kdbench's own help, `kdbench list`, `--cfg job` stating the
sweep, debug presets, shell completion; and options checked when the config is composed."""
import os
import re
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from kdbench.commands import header_sentence, sweep_of
from kdbench.config import CONF_DIR
from tests.conftest import KDBENCH, compose_config, kdbench_cli


def _cli(tmp_path, *args, env=None):
    return kdbench_cli(tmp_path, *args, env={"PYTHONWARNINGS": "ignore", **(env or {})})


def test_help_is_kdbenchs_own_with_subcommands_groups_and_choices(tmp_path):
    for flag in ("--help", "-h"):
        out = _cli(tmp_path, flag)
        assert out.returncode == 0, out.stderr
        text = out.stdout
        assert "powered by Hydra" not in text and "_schema" not in text
        for command in ("kdbench report", "kdbench list", "kdbench teachers", "kdbench export", "--cfg job",
                        "--hydra-help", "-sc install=bash", "README.md"):
            assert command in text, command
        assert "method: " in text and re.search(r"\bdkd,", text) and "dataset: " in text and "digits" in text
        assert "logger: " in text and "csv, none, tensorboard, wandb" in text and "fast, limit" in text
    assert not list(tmp_path.iterdir())  # help runs nothing


def test_hydra_help_stays_reachable(tmp_path):
    out = _cli(tmp_path, "--hydra-help")
    assert out.returncode == 0 and "Hydra (" in out.stdout and "--shell-completion" in out.stdout


def _list(capsys, *args) -> tuple[int, str]:
    from kdbench.commands import list_main

    code = list_main(list(args))
    return code, capsys.readouterr().out


def test_list_runs_through_the_kdbench_command(tmp_path):
    out = _cli(tmp_path, "list", "methods", "dkd")
    assert out.returncode == 0 and out.stdout.splitlines()[0].startswith("dkd ")
    assert _cli(tmp_path, "list", "widgets").returncode == 2


def test_list_gives_one_described_line_per_choice_and_filters_like_timm(capsys):
    from kdbench.distill import list_methods, method_class
    from kdbench.models import list_models

    code, text = _list(capsys, "methods")
    assert code == 0
    lines = {line.split()[0]: line for line in text.splitlines()}
    assert set(list_methods()) <= set(lines)
    assert "Hinton, Vinyals & Dean" in lines["kd"] and "code: HobbitLong/RepDistiller" in lines["kd"]
    assert lines["crd_kd"].split(None, 1)[1].startswith("[crd] CRD + KD")  # a config variant names its method
    code, text = _list(capsys, "models", "resnet*")
    names = [line.split()[0] for line in text.splitlines()]
    assert set(names) == {m for m in list_models() if m.lower().startswith("resnet")}
    assert "CIFAR ResNet depth 56" in text
    code, text = _list(capsys, "experiments", "crd")
    assert [line.split()[0] for line in text.splitlines()] == ["crd_cifar100_cross", "crd_cifar100_same", "crd_imagenet"]
    assert header_sentence(CONF_DIR / "experiment" / "crd_cifar100_same.yaml")[:40] in text
    code, text = _list(capsys, "datasets")
    assert "digits " in text and "scikit-learn's bundled 8x8 digits" in text
    assert _list(capsys, "models", "zzz*")[0] == 1
    for name in list_methods():
        cls = method_class(name)
        if cls.__module__.startswith("kdbench.methods."):
            assert cls.paper and cls.code, name


def test_every_model_has_a_one_line_description():
    from kdbench.commands import list_models_described

    assert all(text for _, text in list_models_described())


def test_cfg_job_states_the_sweep_the_command_runs(tmp_path):
    out = _cli(tmp_path, "--cfg", "job")
    assert out.returncode == 0
    assert out.stdout.startswith("# kdbench: this command is a sweep of 6 jobs: method=vanilla,kd x seed=1,2,3.")
    assert "  name: kd\n" in out.stdout  # Hydra's config follows, after the note
    assert _cli(tmp_path, "--cfg", "job", "method=kd", "seed=1").stdout.startswith("# kdbench: this command runs one job")
    assert sweep_of(["--cfg", "job", "method=kd", "seed=1,2"]) == {"seed": ["1", "2"]}
    assert sweep_of(["-m", "method=kd,dkd", "seed=1", "--cfg", "job"]) == {"method": ["kd", "dkd"]}
    swept = sweep_of(["--cfg", "job", "experiment=dkd_cifar100_same", "pair=resnet56-resnet20"])
    assert set(swept) == {"method", "seed"} and len(swept["seed"]) == 5


def test_debug_presets_run_a_few_batches_for_one_epoch_without_the_real_store():
    cfg = compose_config(["debug=fast"], return_hydra_config=True)
    assert cfg.trainer.epochs == 1 and (cfg.dataset.train_size, cfg.dataset.test_size) == (256, 128)
    assert cfg.paths.teacher_store.endswith("/debug/teachers") and cfg.teacher.recipe.trainer.epochs == 1
    assert cfg.hydra.sweeper.params.seed == "1"
    exp = compose_config(["debug=fast", "experiment=crd_cifar100_same"], return_hydra_config=True)
    assert exp.trainer.epochs == 1 and exp.dataset.train_size == 256 and exp.hydra.sweeper.params.seed == "1"
    limit = compose_config(["debug=limit"])
    assert limit.trainer.epochs == 3 and limit.dataset.train_size == 2048


@pytest.mark.slow
def test_debug_fast_trains_one_short_job_and_leaves_the_real_store_alone(tmp_path):
    import json

    out = _cli(tmp_path, "debug=fast", "method=kd")
    assert out.returncode == 0, out.stderr[-2000:]
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "multirun").glob("*/*/metrics.json")]
    assert record["epochs_done"] == 1 and record["n_train"] == 256 and record["n_test"] == 128
    assert not (tmp_path / "teachers").exists()
    (entry,) = (tmp_path / "debug" / "teachers").iterdir()
    assert json.loads((entry / "train" / "metrics.json").read_text())["epochs_done"] == 1


def test_shell_completion_is_hydras_and_completes_kdbench_options(tmp_path):
    out = _cli(tmp_path, "-sc", "install=bash")
    assert out.returncode == 0 and "hydra_bash_completion" in out.stdout
    env = {**os.environ, "COMP_LINE": "kdbench method=dk", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([*KDBENCH, "-sc", "query=bash"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "method=dkd" in out.stdout.split() and "method=kd" not in out.stdout.split()


def test_precision_and_device_are_checked_when_the_config_is_composed():
    assert compose_config(["trainer.precision=fp16", "trainer.device=cuda:1"]).trainer.precision == "fp16"
    for bad in ("trainer.precision=fp61", "trainer.precision=half", "trainer.device=gpu", "trainer.device=cuda:x"):
        with pytest.raises(ConfigCompositionException) as err:
            compose_config([bad])
        assert "expected one of" in str(err.value.__cause__)


def test_a_bad_precision_stops_the_command_before_any_job(tmp_path):
    out = _cli(tmp_path, "method=vanilla", "trainer.precision=fp61")
    assert out.returncode == 1
    assert "fp61" in out.stderr and "expected one of [fp32, bf16, fp16]" in out.stderr
    assert not list(tmp_path.glob("multirun/*/*/metrics.json"))  # no job folder got a record: nothing started


def test_a_misspelt_method_option_is_refused_with_the_closest_name(tmp_path):
    out = _cli(tmp_path, "method=kd", "seed=1", "+method.temprature=2", "trainer.progress=false")
    assert out.returncode == 1
    assert "method 'kd' has no option 'temprature' (did you mean 'method.temperature'?)" in out.stdout + out.stderr
    assert not (tmp_path / "teachers").exists()  # refused before its teacher was trained


def test_the_package_metadata_uses_the_current_license_field():
    import tomllib

    from tests.conftest import REPO

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"  # an SPDX string: setuptools' license-table banner is gone
    assert not any("License ::" in c for c in project["project"].get("classifiers", []))
    build = project["build-system"]["requires"]
    assert any(r.startswith("setuptools>=") and int(r.split(">=")[1].split(".")[0]) >= 77 for r in build)
