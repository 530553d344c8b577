"""CI regression of accuracy: run the small digits sweep and compare each method with its stored band.

    python scripts/regression.py                 # run the sweep, check against results/regression/bands.csv
    python scripts/regression.py --rebaseline    # after an intended change: rerun, rewrite the bands, and
                                                 # keep the sweep's records in results/regression/records/

A method fails when its mean last-epoch top-1 over the seeds drops below its band's lower bound,
mean - max(3 * std, FLOOR) of the baseline sweep (FLOOR: 5 test images of digits' 360).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from kdbench.report import leaderboard, load_records

REPO = Path(__file__).resolve().parents[1]
BANDS = REPO / "results" / "regression" / "bands.csv"
RECORDS = REPO / "results" / "regression" / "records"
COMMAND = ["-m", "experiment=kdbench_digits_regression"]
FLOOR = 5 * 100 / 360


def run_sweep(out: Path) -> pd.DataFrame:
    """Run the regression sweep into `out` and return its leaderboard (one row per method)."""
    env = {**os.environ, "KDBENCH_RESULTS": str(out)}
    done = subprocess.run([sys.executable, "-c", "from kdbench.cli import main; main()", *COMMAND,
                           f"hydra.sweep.dir={out}/sweep"], env=env, cwd=out, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"regression sweep failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return leaderboard(load_records([out / "sweep"]))


def bands_from(board: pd.DataFrame) -> pd.DataFrame:
    bands = board[["dataset", "teacher", "student", "method", "n", "last_mean", "last_std"]].copy()
    bands["lower"] = bands["last_mean"] - (3 * bands["last_std"]).clip(lower=FLOOR)
    bands["command"] = "kdbench " + " ".join(COMMAND)
    return bands.round(4)


def check(board: pd.DataFrame, bands: pd.DataFrame) -> list[str]:
    """Messages for every banded method that is missing or below its band."""
    merged = bands.merge(board, on=["dataset", "teacher", "student", "method"], how="left", suffixes=("_band", ""))
    problems = []
    for row in merged.itertuples():
        if pd.isna(row.last_mean):
            problems.append(f"{row.method}: no completed runs")
        elif row.last_mean < row.lower:
            problems.append(f"{row.method}: last top-1 {row.last_mean:.2f} is below its band {row.lower:.2f} "
                            f"(baseline {row.last_mean_band:.2f} ± {row.last_std_band:.2f}, n={row.n_band})")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebaseline", action="store_true", help="rewrite the bands from a fresh sweep")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        board = run_sweep(Path(tmp))
        if args.rebaseline:
            BANDS.parent.mkdir(parents=True, exist_ok=True)
            bands_from(board).to_csv(BANDS, index=False)
            shutil.rmtree(RECORDS, ignore_errors=True)
            for record in (Path(tmp) / "sweep").glob("*/metrics.json"):
                (RECORDS / record.parent.name).mkdir(parents=True)
                shutil.copy(record, RECORDS / record.parent.name / "metrics.json")
            print(f"wrote {BANDS} and {RECORDS}")
            return 0
        problems = check(board, pd.read_csv(BANDS, keep_default_na=False))
    print("\n".join(problems) or "all methods within their bands")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
