"""CI regression of accuracy: the digits sweep must stay within the bands in results/regression/bands.csv.

After an intended change in accuracy, re-baseline with `python scripts/regression.py --rebaseline` and commit
the new bands and records.
"""
import importlib.util

import pandas as pd

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("regression", REPO / "scripts" / "regression.py")
regression = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regression)


def _bands():
    return pd.read_csv(regression.BANDS, keep_default_na=False)


def test_every_method_within_its_accuracy_band(tmp_path):
    board = regression.run_sweep(tmp_path)
    assert regression.check(board, _bands()) == []


def test_check_flags_a_drop_and_a_missing_method():
    bands = _bands()
    board = bands[["dataset", "teacher", "student", "method", "n", "last_mean", "last_std"]].copy()
    board.loc[board["method"] == "kd", "last_mean"] -= 10
    board = board[board["method"] != "pkt"]
    problems = regression.check(board, bands)
    assert len(problems) == 2
    assert any(p.startswith("kd: last top-1") for p in problems) and "pkt: no completed runs" in problems
