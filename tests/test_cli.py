"""The command line as users run it: sweeps write records and a leaderboard; a failing job does not stop a sweep."""
import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from kdbench.report import build_report, leaderboard, load_paper, load_records, paper_tables
from tests.conftest import KDBENCH, kdbench_cli

FAST = ["teacher=mlp_32", "trainer.epochs=2", "trainer.progress=false"]


def test_multirun_writes_records_and_prints_leaderboard(tmp_path):
    out = kdbench_cli(tmp_path, "-m", "method=vanilla,kd", "seed=1,2", *FAST)
    assert out.returncode == 0, out.stderr[-2000:]
    (sweep,) = (tmp_path / "multirun").iterdir()
    records = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    assert sorted((r["method"], r["seed"], r["status"]) for r in records) == [
        ("kd", 1, "completed"), ("kd", 2, "completed"), ("vanilla", 1, "completed"), ("vanilla", 2, "completed")]
    assert "| digits | mlp_32 | mlp_32 | kd |" in out.stdout and "| 2 |" in out.stdout
    for ext in ("md", "csv", "html"):
        assert (sweep / f"leaderboard.{ext}").stat().st_size > 0
    # the stored teacher's own training record is a row of the sweep's leaderboard (a table's teacher row); it is a
    # vanilla mlp_32 trained with the digits recipe (30 epochs: the students' trainer.epochs=2 does not shape it), so
    # it is a row of its own beside the 2-epoch vanilla students
    (store_record,) = (tmp_path / "teachers").glob("mlp_32-*/train/metrics.json")
    teacher_record = json.loads(store_record.read_text())
    assert teacher_record["overrides"] == ["(teacher for the store)", "teacher=mlp_32"]
    assert teacher_record["epochs_done"] == 30
    board = pd.read_csv(sweep / "leaderboard.csv", dtype={"teacher": str, "setting": str}, keep_default_na=False)
    rows = board[list(("dataset", "teacher", "student", "method", "setting", "n"))].to_dict("records")
    assert {"dataset": "digits", "teacher": "", "student": "mlp_32", "method": "vanilla", "setting": "trainer.epochs=2",
            "n": 2} in rows
    assert {"dataset": "digits", "teacher": "", "student": "mlp_32", "method": "vanilla", "setting": "", "n": 1} in rows


def test_teachers_of_different_recipes_are_separate_rows(tmp_path):
    out = kdbench_cli(tmp_path, "method=kd", "seed=1", "+teacher.recipe.trainer.epochs=1,2", *FAST)
    assert out.returncode == 0, out.stderr[-2000:]
    (sweep,) = (tmp_path / "multirun").iterdir()
    board = pd.read_csv(sweep / "leaderboard.csv", dtype={"teacher": str, "setting": str}, keep_default_na=False)
    teachers = board[board["method"] == "vanilla"]
    assert sorted(teachers["setting"]) == ["+teacher.recipe.trainer.epochs=1", "+teacher.recipe.trainer.epochs=2"]
    assert teachers["n"].tolist() == [1, 1]


def test_failing_job_leaves_other_records_and_report(tmp_path):
    out = kdbench_cli(tmp_path, "method=vanilla", "optim.lr=0.05,1e12", *FAST)
    assert out.returncode == 1 and "did not complete" in out.stderr
    (sweep,) = (tmp_path / "multirun").iterdir()
    statuses = {json.loads(p.read_text())["config"]["optim"]["lr"]: json.loads(p.read_text())["status"]
                for p in sweep.glob("*/metrics.json")}
    assert statuses == {0.05: "completed", 1e12: "failed"}
    assert "NonFiniteLoss" in (sweep / "leaderboard.md").read_text()


def test_two_sweeps_in_the_same_second_do_not_collide(tmp_path):
    procs = [subprocess.Popen([*KDBENCH, "method=vanilla", "seed=1", "trainer.epochs=1", "trainer.progress=false"],
                              env={**os.environ, "KDBENCH_RESULTS": str(tmp_path)}, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert len(list((tmp_path / "multirun").iterdir())) == 2


def test_report_subcommand(tmp_path):
    assert kdbench_cli(tmp_path, "method=kd", "seed=1", *FAST).returncode == 0
    for flags, teacher_row in ((["--no-teachers"], False), ([], True)):
        out = subprocess.run([*KDBENCH, "report", str(tmp_path / "multirun"), "--out", str(tmp_path / "rep"), *flags],
                             capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert out.returncode == 0 and "| digits | mlp_32 | mlp_32 | kd |" in out.stdout
        assert ("| digits | mlp_32 | — | teacher (vanilla) |" in out.stdout) == teacher_row
    assert (tmp_path / "rep" / "leaderboard.html").exists()


def _fake_record(root: Path, name: str, **fields):
    d = root / name
    d.mkdir(parents=True)
    rec = {"status": "completed", "dataset": "mnist", "teacher": "mlp_1200x2", "student": "mlp_800x2", "method": "kd",
           "overrides": [], "n_test": 10000, **fields}
    (d / "metrics.json").write_text(json.dumps(rec))


def test_leaderboard_statistics_and_paper_diff(tmp_path):
    for i, (last, best) in enumerate([(99.20, 99.30), (99.30, 99.40), (99.10, 99.35)]):
        _fake_record(tmp_path, f"r{i}", seed=i, last_top1=last, best_top1=best)
    _fake_record(tmp_path, "other", seed=0, last_top1=50.0, best_top1=50.0, overrides=["method.temperature=20"])
    _fake_record(tmp_path, "broken", seed=9, status="failed", last_top1=None, best_top1=None, error="boom")
    board = leaderboard(load_records([tmp_path]), load_paper())
    row = board[(board["setting"] == "") & (board["paper"] == "Hinton2015")].iloc[0]
    assert row["n"] == 3 and abs(row["last_mean"] - 99.20) < 1e-9 and abs(row["last_std"] - 0.1) < 1e-9
    # Hinton reports test errors at the last epoch: (100 - 99.2)% of 10000 = 80 errors vs 74 in the paper.
    assert abs(row["ours"] - 80.0) < 1e-6 and abs(row["delta"] - 6.0) < 1e-6
    assert abs(row["tol"] - 20.0) < 1e-6 and bool(row["within"])  # max(2 * 0.1, mnist floor 0.1) points = 20 errors
    assert (board["setting"] == "method.temperature=20").sum() == 1  # other settings are never averaged in
    # the paper's cells on the same dataset that were not run are listed, so a partial table shows its gaps
    not_run = board[board["n"] == 0]
    assert ("mnist", "", "mlp_800x2", "vanilla") in set(map(tuple, not_run[["dataset", "teacher", "student", "method"]].values))
    assert not_run["last_mean"].isna().all() and not (board["dataset"] == "cifar100").any()
    md = build_report([tmp_path], tmp_path / "out")
    assert "Hinton2015" in md and "boom" in md


def test_paper_rows_compare_only_with_runs_of_their_recipe(tmp_path):
    """Hinton2015's rows name hinton_mnist: a run of another experiment is not diffed with them (its cell stays
    'not run' for the paper); a run of hinton_mnist, or one made without an experiment, is."""
    for name, overrides in (("theirs", ["experiment=hinton_mnist"]), ("adhoc", []), ("other", ["experiment=regression_digits"])):
        _fake_record(tmp_path / name, "r", seed=1, last_top1=99.2, best_top1=99.2, overrides=overrides)
    paper = load_paper()
    compared = {name: leaderboard(load_records([tmp_path / name]), paper) for name in ("theirs", "adhoc", "other")}
    for name in ("theirs", "adhoc"):
        row = compared[name][compared[name]["n"] == 1].iloc[0]
        assert row["paper"] == "Hinton2015" and abs(row["ours"] - 80.0) < 1e-6
    other = compared["other"]
    assert other[other["n"] == 1]["value"].isna().all()  # ours, not compared
    assert ("mlp_1200x2", "mlp_800x2", "kd", 0) in set(map(tuple, other[["teacher", "student", "method", "n"]].values))


def test_wandb_logger_without_api_key_runs_offline_without_prompting(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    out = subprocess.run([*KDBENCH, "logger=wandb", "method=vanilla", "seed=1", *FAST], capture_output=True, text=True,
                         env={**env, "KDBENCH_RESULTS": str(tmp_path)}, cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (job,) = (tmp_path / "multirun").glob("*/0")
    assert list((job / "wandb").glob("offline-run-*"))


def test_terminated_job_records_interrupted(tmp_path):
    import signal
    import time

    proc = subprocess.Popen([*KDBENCH, "method=vanilla", "seed=1", "teacher=mlp_32", "trainer.epochs=500"],
                            env={**os.environ, "KDBENCH_RESULTS": str(tmp_path)}, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("multirun/*/0/checkpoint.pt")):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    (record,) = tmp_path.glob("multirun/*/0/metrics.json")
    rec = json.loads(record.read_text())
    assert rec["status"] == "interrupted" and len(rec["history"]) >= 1


@pytest.mark.slow
def test_table_experiment_runs_teachers_then_students_with_teacher_rows(tmp_path):
    """A table's sweep end to end (TAKD's plain-CNN chain on CIFAR-shaped synthetic data): the big teacher is trained
    into the store, then the TA by kd from it, then the students; the leaderboard has a row for each, and the
    teachers' rows carry what shapes them (the experiment, the tiny data, their own short recipe), not the students'
    method or epochs."""
    tiny = ["dataset=synthetic", "dataset.num_classes=10", "dataset.train_size=64", "dataset.test_size=32",
            "trainer.batch_size=16", "trainer.epochs=1", "trainer.progress=false", "++teacher.recipe.trainer.epochs=2",
            "++teacher.distill.from.recipe.trainer.epochs=2"]
    out = kdbench_cli(tmp_path, "experiment=takd_cifar10", "pair=plain_cnn_10-plain_cnn_4-plain_cnn_2", "method=vanilla,kd",
                   "seed=1", *tiny)
    assert out.returncode == 0, out.stderr[-2000:]
    (sweep,) = (tmp_path / "multirun").iterdir()
    board = pd.read_csv(sweep / "leaderboard.csv", dtype={"teacher": str, "setting": str}, keep_default_na=False)
    rows = {(r.teacher, r.student, r.method): r.setting for r in board.itertuples()}
    assert set(rows) == {("", "plain_cnn_10", "vanilla"), ("plain_cnn_10", "plain_cnn_4_ta", "kd"),
                         ("", "plain_cnn_2", "vanilla"), ("plain_cnn_4_ta", "plain_cnn_2", "kd")}
    data = "dataset.num_classes=10 dataset.test_size=32 dataset.train_size=64 experiment=takd_cifar10"
    both = f"++teacher.distill.from.recipe.trainer.epochs=2 ++teacher.recipe.trainer.epochs=2 {data}"
    assert rows[("", "plain_cnn_10", "vanilla")] == rows[("plain_cnn_10", "plain_cnn_4_ta", "kd")] == both
    assert rows[("plain_cnn_4_ta", "plain_cnn_2", "kd")] == (f"{both} pair=plain_cnn_10-plain_cnn_4-plain_cnn_2 "
                                                         "trainer.batch_size=16 trainer.epochs=1")
    finished = {(rec["student"], rec["method"]): rec["finished_at"]
                for rec in (json.loads(p.read_text()) for p in tmp_path.rglob("metrics.json"))}
    assert finished[("plain_cnn_10", "vanilla")] <= finished[("plain_cnn_4_ta", "kd")] <= finished[("plain_cnn_2", "kd")]


def test_paper_tables_lay_out_ours_beside_the_paper(tmp_path):
    """A CRD-style table: methods as rows, pairs as columns, "ours / paper" cells; a cell not run says so."""
    paper = tmp_path / "paper"
    paper.mkdir()
    head = "paper,table,dataset,teacher,student,method,metric,value,protocol,runs,source\n"
    cells = [("resnet56", "resnet20", "kd", 70.66), ("resnet56", "resnet20", "crd", 71.16),
             ("vgg13", "vgg8", "kd", 72.98), ("vgg13", "vgg8", "crd", 73.94)]
    (paper / "P.csv").write_text(head + "".join(f"P,T1,cifar100,{t},{s},{m},top1,{v},last,1,src\n" for t, s, m, v in cells))
    for i, (t, s, m, top1) in enumerate([("resnet56", "resnet20", "kd", 70.0), ("resnet56", "resnet20", "kd", 71.0),
                                          ("vgg13", "vgg8", "crd", 74.0)]):
        _fake_record(tmp_path / "runs", str(i), dataset="cifar100", teacher=t, student=s, method=m, seed=i,
                     last_top1=top1, best_top1=top1)
    ((name, grid),) = paper_tables(leaderboard(load_records([tmp_path / "runs"]), load_paper(paper)))
    assert name == "P: T1" and list(grid.columns) == ["method", "resnet56→resnet20", "vgg13→vgg8"]
    rows = grid.set_index("method")
    # kd: mean of 70 and 71 = 70.5, tol 2 * 0.71 covers -0.16; crd: one run, the CIFAR-100 floor 0.5 covers +0.06
    assert rows.loc["kd", "resnet56→resnet20"] == "70.50 / 70.66 ✓"
    assert rows.loc["crd", "vgg13→vgg8"] == "74.00 / 73.94 ✓"
    assert rows.loc["kd", "vgg13→vgg8"] == "not run / 72.98" and rows.loc["crd", "resnet56→resnet20"] == "not run / 71.16"
