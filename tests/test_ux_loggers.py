"""Loggers: csv by default (per-epoch rows pandas reads), tensorboard, wandb (online with a stored key, WANDB_MODE
honoured, one `wandb sync` line when offline), several at once."""
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from kdbench.loggers import CSVLogger, create_logger, selected, wandb_mode
from tests.conftest import compose_config, kdbench_cli

FAST = ["method=vanilla", "seed=1", "trainer.epochs=3", "trainer.progress=false"]


def test_the_default_logger_writes_one_csv_row_per_epoch_that_pandas_reads(run_job, tmp_path):
    assert dict(compose_config().logger) == {"csv": {"file": "metrics.csv"}}
    record = run_job(*FAST)
    table = pd.read_csv(tmp_path / "job" / "metrics.csv")
    assert table["epoch"].tolist() == [1, 2, 3]
    assert {"lr", "test/top1", "test/loss", "train/loss", "train/ce"} <= set(table.columns)
    assert table["test/top1"].tolist() == pytest.approx([h["test_top1"] for h in record["history"]])
    assert table["train/ce"].tolist() == pytest.approx([h["train"]["ce"] for h in record["history"]])


def test_a_resumed_run_keeps_the_csv_rows_of_the_epochs_before_it(tmp_path):
    first = CSVLogger({}, tmp_path)
    for epoch in (1, 2, 3):
        first.log({"lr": 0.1, "test/top1": 10.0 * epoch}, epoch)
    again = CSVLogger({}, tmp_path)  # the run restarts from epoch 3 (its checkpoint held epochs 1-2)
    again.log({"lr": 0.1, "test/top1": 99.0, "train/new": 1.0}, 3)
    table = pd.read_csv(tmp_path / "metrics.csv")
    assert table["epoch"].tolist() == [1, 2, 3] and table["test/top1"].tolist() == [10.0, 20.0, 99.0]
    assert table["train/new"].isna().tolist() == [True, True, False]


def test_several_loggers_at_once_compose_as_a_list_and_each_writes(run_job, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert set(compose_config(["logger=[csv,tensorboard,wandb]"]).logger) == {"csv", "tensorboard", "wandb"}
    assert dict(compose_config(["logger=none"]).logger) == {}
    record = run_job(*FAST, "logger=[csv,tensorboard]")
    job = tmp_path / "job"
    assert len(pd.read_csv(job / "metrics.csv")) == 3
    events = EventAccumulator(str(job / "tensorboard"))
    events.Reload()
    top1 = events.Scalars("test/top1")
    assert [e.step for e in top1] == [1, 2, 3]
    assert [e.value for e in top1] == pytest.approx([h["test_top1"] for h in record["history"]], abs=1e-4)


def test_an_unknown_logger_is_refused_naming_the_choices():
    with pytest.raises(Exception, match="csv, tensorboard, wandb"):
        selected({"csvv": {}})
    assert create_logger({"name": "none"}, Path("."), {}, {}).__class__.__name__ == "NullLogger"  # the older form


@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("WANDB"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))


def test_wandb_goes_online_with_the_key_wandb_login_stored(no_wandb_env, tmp_path, monkeypatch):
    assert wandb_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a server of its own: its own netrc entry
    assert wandb_mode("auto") == "offline"
    monkeypatch.delenv("WANDB_BASE_URL")
    monkeypatch.setenv("WANDB_MODE", "offline")  # the user's WANDB_MODE wins over a stored key
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    (tmp_path / "netrc").unlink()
    assert wandb_mode("auto") == "online" and wandb_mode("offline") == "offline"


def test_an_offline_wandb_run_prints_one_line_with_its_sync_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env["NETRC"] = str(tmp_path / "no-netrc")
    import subprocess

    from tests.conftest import KDBENCH

    out = subprocess.run([*KDBENCH, "logger=[csv,wandb]", *FAST], capture_output=True, text=True,
                         env={**env, "KDBENCH_RESULTS": str(tmp_path)}, cwd=tmp_path, stdin=subprocess.DEVNULL,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if "wandb sync" in line]
    assert len(lines) == 1 and "offline" in lines[0]
    run_dir = Path(re.search(r"wandb sync (\S+)", lines[0]).group(1))
    (job,) = (tmp_path / "multirun").glob("*/0")
    assert run_dir.parent == job / "wandb" and run_dir.name.startswith("offline-run-") and run_dir.is_dir()
    assert (job / "metrics.csv").exists()
