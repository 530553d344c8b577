"""Every config group option composes with Hydra's compose API; typos and unknown options fail at composition."""
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigKeyError

from kdbench.config import CONF_DIR
from tests.conftest import compose_config

GROUPS = ["dataset", "model", "teacher", "student", "method", "optim", "schedule", "trainer", "logger", "paths", "experiment"]


def _options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS if g != "model" for o in _options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose_config([f"{group}={option}"])
    assert cfg[group] is not None if group != "experiment" else True


@pytest.mark.parametrize("option", _options("model"))
def test_every_model_has_teacher_and_student_configs(option):
    cfg = compose_config([f"teacher={option}", f"student={option}"])
    assert cfg.teacher.model.name and cfg.student.label == option == cfg.teacher.label


def test_default_is_the_digits_demo_sweep():
    cfg = compose_config()
    assert cfg.dataset.name == "digits" and cfg.method.name == "kd"


def test_misspelt_schema_key_fails_at_composition():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_config(["trainer.epoch=3"])


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(MissingConfigException) as err:
        compose_config(["method=no_such_method"])
    assert "kd" in str(err.value) and "vanilla" in str(err.value)


def test_data_dir_comes_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KDBENCH_DATA", str(tmp_path))
    assert compose_config().dataset.root == str(tmp_path)
