"""Leaderboards from run records, diffed against published numbers.

`kdbench-report DIR [DIR ...]` (or `kdbench report ...`) reads every metrics.json below the given dirs, groups
completed runs by dataset/teacher/student/method/setting over seeds (mean, std, n of last- and best-epoch top-1),
joins results/paper/*.csv on dataset/teacher/student/method, and compares like with like: last-epoch means with
last-epoch tables, best-epoch with best-epoch, accuracy or error counts as the paper reports them. A paper row that
names its `experiments` (those that run its recipe) is compared only with runs of those experiments, or with runs
made without one; a run of another experiment (another recipe for the same cell) is not compared with it.
The tolerance per cell is max(2 * std of our seeds, a per-dataset floor) and is shown beside each cell.
Metrics: top1 and top5 (accuracy %), test_errors (misclassified test samples), test_errors_class<k> (those of true
class k).
"""
from __future__ import annotations

import argparse
import csv
import html
import json
import math
import sys
from pathlib import Path

import pandas as pd

from kdbench.config import current_experiment, override_key, semantic_overrides
from kdbench.io import write_json
from kdbench.record import RECORD_FILE, effective_status

PAPER_DIR = Path(__file__).resolve().parent / "paper"  # published numbers, shipped with the package
KEYS = ["dataset", "teacher", "student", "method"]
# Smallest tolerance (top-1 percentage points) per dataset, for when our seeds happen to agree closely:
# roughly the run-to-run spread reported for each benchmark (CIFAR-100: +-0.5-1 point, RepDistiller#62).
TOLERANCE_FLOOR = {"cifar100": 0.5, "cifar10": 0.3, "mnist": 0.1, "digits": 1.0, "synthetic": 2.0, "imagenet": 0.2}
DEFAULT_FLOOR = 0.5
_GROUP_CHOICES = {"seed", "method", "dataset", "teacher", "student"}


def find_records(paths) -> list[Path]:
    found = []
    for p in map(Path, paths):
        found.extend([p] if p.is_file() else sorted(p.rglob(RECORD_FILE)))
    return found


def _setting(overrides) -> str:
    """The overrides that change a result (kdbench.config.NON_SEMANTIC left out) other than the grouping choices
    and the seed: runs with different settings are not averaged."""
    keep = [o for o in semantic_overrides(overrides or []) if override_key(o) not in _GROUP_CHOICES]
    return " ".join(sorted(keep))


def teacher_records(paths) -> list[Path]:
    """The teacher store's training records of the teachers that the runs below `paths` learned from (TA chains
    followed to the first teacher): a sweep's own leaderboard then carries the tables' teacher rows."""
    todo, found = find_records(paths), []
    while todo:
        path = todo.pop()
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            source = (rec.get("teacher_source") or {}) if isinstance(rec, dict) else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # load_records reports unreadable records
        train = Path(source["path"]).parent / "train" / RECORD_FILE if source.get("kind") == "store" else None
        if train is not None and train.exists() and train not in found:
            found.append(train)
            todo.append(train)
    return found


def _read(path: Path) -> dict | None:
    """A record, or None (with a warning naming the file) when it is not a readable UTF-8 JSON object."""
    try:
        rec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        print(f"kdbench-report: skipping unreadable {path}: {err}", file=sys.stderr)
        return None
    if not isinstance(rec, dict):
        print(f"kdbench-report: skipping {path}: a record is a JSON object, this holds a {type(rec).__name__}",
              file=sys.stderr)
        return None
    return rec


def load_records(paths) -> pd.DataFrame:
    rows = []
    for path in find_records(paths):
        rec = _read(path)
        if rec is None:
            continue
        rows.append({**{k: rec.get(k) or "" for k in KEYS}, "setting": _setting(rec.get("overrides")),
                     "seed": rec.get("seed"), "status": effective_status(rec), "last_top1": rec.get("last_top1"),
                     "best_top1": rec.get("best_top1"), "last_top5": rec.get("last_top5"),
                     "best_top5": rec.get("best_top5"), "n_test": rec.get("n_test"), "error": rec.get("error"),
                     "epochs_done": rec.get("epochs_done"), "last_class_errors": rec.get("last_class_errors"),
                     "path": str(path.parent)})
    return pd.DataFrame(rows, columns=[*KEYS, "setting", "seed", "status", "last_top1", "best_top1", "last_top5",
                                       "best_top5", "n_test",
                                       "error", "epochs_done", "last_class_errors", "path"])


PAPER_COLUMNS = [*KEYS, "paper", "table", "metric", "value", "protocol", "runs", "source", "experiments"]


REQUIRED_PAPER_COLUMNS = [c for c in PAPER_COLUMNS if c != "experiments"]


def _paper_rows(path: Path) -> list[dict]:
    """The valid rows of one paper CSV; a malformed row is skipped with a warning naming the file and line."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_PAPER_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            print(f"kdbench-report: skipping {path}: no column(s) {missing}", file=sys.stderr)
            return []
        rows = []
        for row in reader:
            problem = None
            if None in row or any(v is None for v in row.values()):
                problem = f"has {len(row.get(None) or []) + len([v for v in row.values() if v is not None])} fields, " \
                          f"the header {len(reader.fieldnames)}"
            else:
                try:
                    float(row["value"])
                except ValueError:
                    problem = f"value {row['value']!r} is not a number"
            if problem:
                print(f"kdbench-report: skipping {path} line {reader.line_num}: {problem}", file=sys.stderr)
                continue
            rows.append({c: row.get(c) or "" for c in PAPER_COLUMNS})
    return rows


def load_paper(paper_dir: Path = PAPER_DIR) -> pd.DataFrame:
    rows = [row for p in sorted(Path(paper_dir).glob("*.csv")) for row in _paper_rows(p)]
    paper = pd.DataFrame(rows, columns=PAPER_COLUMNS)
    paper["value"] = pd.to_numeric(paper["value"])
    return paper


def experiment_of(setting: str) -> str:
    """The experiment a leaderboard row's runs were launched with ("" for runs composed without one)."""
    return next((current_experiment(o.split("=", 1)[1]) for o in str(setting).split() if o.startswith("experiment=")), "")


def same_recipe(setting: str, experiments: str) -> bool:
    """Whether runs with this setting may be compared with a paper row that lists these experiments."""
    ours = experiment_of(setting)
    return not ours or not experiments or ours in experiments.split()


def leaderboard(records: pd.DataFrame, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    done = records[records["status"] == "completed"]
    if done.empty:
        return pd.DataFrame()
    board = (done.groupby([*KEYS, "setting"], dropna=False)
             .agg(n=("seed", "count"), last_mean=("last_top1", "mean"), last_std=("last_top1", "std"),
                  best_mean=("best_top1", "mean"), best_std=("best_top1", "std"), n_test=("n_test", "max"),
                  last5_mean=("last_top5", "mean"), last5_std=("last_top5", "std"),
                  best5_mean=("best_top5", "mean"), best5_std=("best_top5", "std"))
             .reset_index())
    board[["last_std", "best_std"]] = board[["last_std", "best_std"]].fillna(0.0)
    stats = done.groupby([*KEYS, "setting"], dropna=False)["last_class_errors"].agg(_class_stats)
    board["class_errors_mean"], board["class_errors_std"] = zip(*(stats[tuple(k)] for k in board[[*KEYS, "setting"]].values))
    if paper is None or paper.empty:
        return board
    paper = paper[PAPER_COLUMNS].reset_index(drop=True).rename_axis("paper_row").reset_index()
    pairs = board.reset_index(names="board_row").merge(paper, on=KEYS, how="inner")
    pairs = pairs[pairs["setting"].combine(pairs["experiments"], same_recipe).astype(bool)]
    unmatched = board.drop(index=pairs["board_row"].unique())
    board = pd.concat([pairs.drop(columns="board_row"), unmatched], ignore_index=True)
    board = board.sort_values([*KEYS, "setting"], kind="stable").reset_index(drop=True).apply(_diff, axis=1)
    # The paper's other cells on the same datasets: a partly run table shows what is still missing (n = 0).
    missing = paper[paper["dataset"].isin(board["dataset"]) & ~paper["paper_row"].isin(pairs["paper_row"])]
    board = board.drop(columns="paper_row")
    if missing.empty:
        return board
    return pd.concat([board, missing[PAPER_COLUMNS].assign(setting="", n=0)], ignore_index=True)


def _class_stats(lists: pd.Series) -> tuple:
    """Per-class mean and std of last-epoch test errors over seeds; (None, None) if any record lacks them."""
    if not all(isinstance(v, list) for v in lists):
        return None, None
    table = pd.DataFrame(list(lists))
    return table.mean().tolist(), table.std().fillna(0.0).tolist()


def tolerance_floor(dataset: str) -> float:
    """mnist-no3 (a transfer set without 3s) is judged like mnist."""
    return TOLERANCE_FLOOR.get(dataset.split("-")[0], DEFAULT_FLOOR)


def _diff(row: pd.Series) -> pd.Series:
    """Our number in the paper's protocol and metric, the difference, and the tolerance it is judged by."""
    if pd.isna(row.get("value")):
        return row
    best = str(row["protocol"]).startswith("best")
    mean, std = (row["best_mean"], row["best_std"]) if best else (row["last_mean"], row["last_std"])
    if row["metric"] == "top5":  # top-5 accuracy (ImageNet tables)
        mean, std = (row["best5_mean"], row["best5_std"]) if best else (row["last5_mean"], row["last5_std"])
        if pd.isna(mean):
            return row  # records without top-5
        std = 0.0 if pd.isna(std) else std
    tol = max(2 * std, tolerance_floor(row["dataset"]))
    scale = row["n_test"] / 100.0
    if row["metric"] == "test_errors":  # error counts out of the test set
        ours, tol = (100.0 - mean) * scale, tol * scale
    elif str(row["metric"]).startswith("test_errors_class"):  # errors on the test samples of one class
        k = int(row["metric"][len("test_errors_class"):])
        if row["class_errors_mean"] is None or best:
            return row  # records without per-class counts, or a best-epoch table: nothing comparable
        ours = row["class_errors_mean"][k]
        tol = max(2 * row["class_errors_std"][k], tolerance_floor(row["dataset"]) * scale)
    else:
        ours = mean
    row["ours"], row["delta"], row["tol"] = ours, ours - row["value"], tol
    row["within"] = abs(row["delta"]) <= tol
    return row


def _pm(mean, std) -> str:
    return "not run" if pd.isna(mean) else f"{mean:.2f} ± {std:.2f}"


def _fmt(x, digits=2) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}" if digits < 0 else f"{x:.{digits}f}"


def display_table(board: pd.DataFrame) -> pd.DataFrame:
    """The human-readable leaderboard: one row per group (and per paper cell it is compared with)."""
    out = pd.DataFrame({
        "dataset": board["dataset"], "teacher": board["teacher"], "student": board["student"],
        "method": board["method"], "setting": board["setting"], "n": board["n"],
        "last top-1": [_pm(m, s) for m, s in zip(board["last_mean"], board["last_std"])],
        "best top-1": [_pm(m, s) for m, s in zip(board["best_mean"], board["best_std"])],
    })
    if "value" in board and board["value"].notna().any():
        has = board["value"].notna()
        out["paper"] = board["paper"].where(has, "")
        out["protocol"] = board["protocol"].where(has, "")
        out["metric"] = board["metric"].where(has, "")
        out["paper value"] = [f"{v:g}" if ok else "" for v, ok in zip(board["value"], has)]
        ours = board.get("ours", pd.Series(float("nan"), index=board.index)).notna()
        out["ours"] = [f"{v:.2f}" if ok else "" for v, ok in zip(board.get("ours", board["value"]), ours)]
        out["Δ vs paper"] = [f"{v:+.2f}" if ok else "" for v, ok in zip(board.get("delta", board["value"]), ours)]
        out["tol"] = [f"±{v:.2f}" if ok else "" for v, ok in zip(board.get("tol", board["value"]), ours)]
        out["ok"] = ["✓" if w is True else "✗" if ok else "" for w, ok in zip(board.get("within", ours), ours)]
    return out.sort_values(["dataset", "teacher", "student", "method", "setting"], kind="stable").reset_index(drop=True)


def paper_tables(board: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Each published table the board touches, laid out as the paper lays it out: one row per method (and variant
    setting), one column per teacher→student cell (and metric, where a table reports several), each cell
    "ours / paper" in the paper's metric and protocol, ✓ when within tolerance."""
    if "value" not in board:
        return []
    cells = board[board["value"].notna()]
    out = []
    for (paper, table), g in cells.groupby(["paper", "table"], sort=True):
        several = g["metric"].nunique() > 1
        cols = [f"{t or '—'}→{s}" + (f" [{m}]" if several else "") for t, s, m in zip(g["teacher"], g["student"], g["metric"])]
        rows = [m + variant(setting) for m, setting in zip(g["method"], g["setting"])]
        text = [f"{'not run' if pd.isna(r.get('ours')) else format(r['ours'], '.2f')} / {r['value']:g}"
                + ("" if pd.isna(r.get("ours")) else " ✓" if r["within"] else " ✗") for _, r in g.iterrows()]
        grid = pd.DataFrame({"row": rows, "col": cols, "text": text}).pivot_table(
            index="row", columns="col", values="text", aggfunc="first", sort=False).fillna("")
        out.append((f"{paper}: {table}", grid.rename_axis(index="method", columns=None).reset_index()))
    return out


def variant(setting) -> str:
    """What sets a row's runs apart beyond their experiment (e.g. a longer teacher recipe), for labels."""
    extra = [o for o in str(setting or "").split() if not o.startswith("experiment=")]
    return f" ({' '.join(extra)})" if extra else ""


def to_markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def to_html(table: pd.DataFrame, title: str) -> str:
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            f"padding:3px 8px;text-align:right}}</style><h1>{html.escape(title)}</h1>"
            + table.to_html(index=False, escape=True))


def failures(records: pd.DataFrame, relative_to: Path | None = None) -> pd.DataFrame:
    """The runs not completed, their paths relative to `relative_to` (the report's folder) when below it."""
    failed = records[~records["status"].isin(["completed"])][[*KEYS, "seed", "status", "error", "path"]].copy()
    if relative_to is not None:
        base = Path(relative_to).resolve()
        failed["path"] = [_relative(p, base) for p in failed["path"]]
    return failed


def _relative(path: str, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(base)) or "."
    except ValueError:
        return path


def build_report(paths, out_dir: Path | None = None, paper_dir: Path = PAPER_DIR, title: str = "kdbench leaderboard") -> str:
    """Write leaderboard.{md,csv,html} (+ leaderboard.json) into out_dir and return the Markdown."""
    records = load_records(paths)
    board = leaderboard(records, load_paper(paper_dir))
    table = display_table(board) if not board.empty else pd.DataFrame()
    md = f"## {title}\n\n" + (to_markdown(table) if not table.empty else "_no completed runs_")
    for name, grid in paper_tables(board):
        md += f"\n\n### {name} (ours / paper)\n\n" + to_markdown(grid)
    failed = failures(records, out_dir)
    if not failed.empty:
        md += "\n\nRuns not completed:\n\n" + to_markdown(failed.fillna(""))
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "leaderboard.md").write_text(md + "\n")
        board.to_csv(out_dir / "leaderboard.csv", index=False)
        (out_dir / "leaderboard.html").write_text(to_html(table, title))
        write_json(out_dir / "leaderboard.json", {"records": len(records), "completed": int((records["status"] == "completed").sum()),
                                                   "failed": len(failed)})
    return md


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kdbench-report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="run or sweep directories (searched recursively for metrics.json)")
    parser.add_argument("--out", type=Path, help="where to write leaderboard.{md,csv,html} (default: the first dir)")
    parser.add_argument("--paper-dir", type=Path, default=PAPER_DIR, help="published numbers (CSV files)")
    parser.add_argument("--title", default="kdbench leaderboard")
    parser.add_argument("--teachers", action="store_true",
                        help="add the teacher store's records of the teachers these runs used (the teacher rows)")
    args = parser.parse_args(argv)
    missing = [d for d in args.dirs if not Path(d).exists()]
    if missing:
        parser.error(f"no such directory: {', '.join(missing)}")
    out = args.out or (Path(args.dirs[0]) if Path(args.dirs[0]).is_dir() else Path(args.dirs[0]).parent)
    paths = [*args.dirs, *teacher_records(args.dirs)] if args.teachers else args.dirs
    print(build_report(paths, out, args.paper_dir, args.title))
    print(f"\n(written to {out}/leaderboard.md, .csv, .html)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
