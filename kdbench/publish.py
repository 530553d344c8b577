"""The published results table: results/README.md, per-table leaderboards and ours-vs-paper plots, generated
from the run records committed under results/<table>/records/ (never written by hand). A table's hand-written
reading of its numbers (what differs from the paper and what was tried), results/<table>/notes.md, is included
as it is.

    python -m kdbench.publish collect <table> <run or sweep dir>...   # copy the runs' metrics.json into results/
    python -m kdbench.publish                                         # regenerate results/README.md and friends

`collect` copies only the records (not checkpoints) and keeps each one's path below the given dir, so a teacher
store's training records (`<store>/<label>-<key>/train/metrics.json`) can be collected beside the sweeps.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import textwrap
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from kdbench.config import CONF_DIR, current_experiment
from kdbench.record import RECORD_FILE
from kdbench.report import (PAPER_DIR, build_report, display_table, find_records, leaderboard, load_paper, load_records,
                            paper_tables, split_table, to_markdown, variant)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
EXPERIMENTS = CONF_DIR / "experiment"
README = "README.md"
PLOT = "vs_paper.png"
NOTES = "notes.md"


def collect(table: str, dirs, results: Path = RESULTS) -> list[Path]:
    """Copy every metrics.json below `dirs` into results/<table>/records/<dir name>/<relative path>."""
    copied = []
    for d in map(Path, dirs):
        for src in find_records([d]):
            dst = results / table / "records" / d.name / src.relative_to(d)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            copied.append(dst)
    return copied


def tables(results: Path = RESULTS) -> list[Path]:
    return sorted(p for p in results.iterdir() if (p / "records").is_dir())


def _raw_records(table: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in find_records([table / "records"])]


def _commands(records: list[dict]) -> list[str]:
    """How the records were produced, from each one's argv (the teacher store's records carry their sweep's), in
    the order they were first run."""
    seen = {}
    for rec in sorted(records, key=lambda r: r.get("started_at") or ""):
        argv = rec.get("argv") or []
        if not argv:
            continue
        prog = Path(argv[0]).name
        cmd = ("python -m kdbench.bias" if prog == "bias.py" else "kdbench" if prog in ("kdbench", "-c") else prog)
        seen.setdefault(" ".join([cmd, *map(portable, argv[1:])]), None)
    return list(seen)


_RESULT_FOLDERS = ("multirun", "runs", "teachers")


def portable(arg: str) -> str:
    """A recorded command-line argument without the absolute path of the machine it ran on: a path below a results
    root becomes `<results>/multirun/...` (runs/, teachers/ likewise), any other absolute path `<dir>/<its name>`;
    `key=/abs/path` keeps its key."""
    key, sep, value = arg.rpartition("=") if "=" in arg else ("", "", arg)
    if not value.startswith(("/", "~")):
        return arg
    parts = Path(value).parts
    for i, part in enumerate(parts):
        if part in _RESULT_FOLDERS and i > 0:
            return f"{key}{sep}<results>/" + "/".join(parts[i:])
    return f"{key}{sep}<dir>/{Path(value).name}"


def _experiments(records: list[dict]) -> set[str]:
    return {current_experiment(o.split("=", 1)[1]) for rec in records for o in rec.get("overrides") or []
            if o.startswith("experiment=")}


def _provenance(records: list[dict]) -> list[str]:
    hw = {json.dumps(rec.get("hardware") or {"device": rec.get("device"), "host": rec.get("host")}, sort_keys=True)
          for rec in records}
    versions = {json.dumps(rec.get("versions") or {}, sort_keys=True) for rec in records}
    shas = sorted({(rec.get("git_sha") or "?")[:7] for rec in records})
    dates = sorted(rec.get("started_at", "")[:10] for rec in records if rec.get("started_at"))
    devices = sorted({str(rec.get("device")) for rec in records})
    lines = [f"- runs: {len(records)} records ({sum(r.get('status') == 'completed' for r in records)} completed), "
             f"{dates[0] if dates else '?'} to {dates[-1] if dates else '?'}, git {', '.join(shas)}",
             f"- device: {', '.join(devices)}; hardware: " + "; ".join(_hw_text(json.loads(h)) for h in sorted(hw)),
             "- versions: " + "; ".join(", ".join(f"{k} {v}" for k, v in json.loads(v).items()) for v in sorted(versions))]
    return lines


def _hw_text(hw: dict) -> str:
    if "cpu" not in hw:
        return f"{hw.get('device')} on {hw.get('host')} (recorded before hardware details were)"
    text = f"{hw['cpu']} ({hw['cpu_count']} cores, {hw['torch_threads']} torch threads)"
    return text + (f", {hw['gpu']}" if hw.get("gpu") else "")


PLOT_WIDTH_IN, PLOT_DPI = 8.0, 120  # 960 px: shown at about that width in results/README.md, so text stays readable


def _cell_label(r) -> str:
    """Two short lines per cell: the pair and method, then dataset, metric, n and any variant setting (wrapped)."""
    if getattr(r, "role", "") == "teacher":
        first = f"teacher {r.student}"
    else:
        first = f"{r.teacher}→{r.student} {r.method}" if r.teacher else f"{r.student} alone ({r.method})"
    second = f"{r.dataset} · {r.metric} · n={r.n}"
    extra = variant(r.setting).strip(" ()")
    lines = [first, second] + (textwrap.wrap(extra, 44, break_on_hyphens=False) if extra else [])
    return "\n".join(lines)


def vs_paper_figure(board: pd.DataFrame, title: str):
    """The figure of plot_vs_paper (None if no cell): one row per paper cell, ours − paper with the report's
    tolerance as the error bar, the two values at the right; laid out to fit its labels (constrained layout)."""
    if board.empty or "delta" not in board or board["delta"].isna().all():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = board[board["delta"].notna()].copy()
    cells["unit"] = ["test errors" if str(m).startswith("test_errors") else "top-1 points" for m in cells["metric"]]
    groups = list(cells.groupby("unit", sort=True))
    row_in = 0.46  # two label lines at 8.5 pt, with room between rows
    heights = [max(1.4, row_in * len(g) + 0.8) for _, g in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(PLOT_WIDTH_IN, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights}, layout="constrained")
    for ax, (unit, g) in zip(axes[:, 0], groups):
        y = list(range(len(g)))
        colors = ["tab:green" if w else "tab:red" for w in g["within"]]
        ax.errorbar(g["delta"], y, xerr=g["tol"], fmt="none", ecolor="0.55", capsize=3)
        ax.scatter(g["delta"], y, c=colors, zorder=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(y, [_cell_label(r) for r in g.itertuples()], fontsize=8.5)
        ax.set_ylim(len(g) - 0.5, -0.5)
        right = ax.twinx()  # ours / paper beside each row, outside the plotting area
        right.set_ylim(ax.get_ylim())
        right.set_yticks(y, [f"{o:.1f} / {p:g}" for o, p in zip(g["ours"], g["value"])], fontsize=8.5)
        right.set_ylabel("ours / paper", fontsize=9)
        ax.set_xlabel(f"ours − paper ({unit})", fontsize=9.5)
        ax.tick_params(axis="x", labelsize=9)
        ax.grid(axis="x", color="0.9")
    fig.suptitle(f"{title}\n(bar: tolerance; green: within it)", fontsize=10.5)
    return fig


def plot_vs_paper(board: pd.DataFrame, path: Path, title: str) -> bool:
    """One point per paper cell: ours minus paper, with the report's tolerance as the error bar. False if no cell."""
    fig = vs_paper_figure(board, title)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return True


def _configured_not_run(run_experiments: set[str]) -> list[str]:
    """One line per conf/experiment entry with no committed records: its sweep size and what it needs."""
    lines = []
    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        name = path.stem
        if name in run_experiments:
            continue
        conf = OmegaConf.load(path)
        hydra_node = conf.get("hydra")
        params = (OmegaConf.to_container(hydra_node) if hydra_node else {}).get("sweeper", {}).get("params", {})
        jobs = 1
        for values in params.values():
            jobs *= len(str(values).split(","))
        dataset = _default_choice(conf, "dataset") or "?"
        summary = _first_sentence(path)
        needs = ("GPU recommended; CIFAR downloads with dataset.download=true" if dataset.startswith("cifar") else
                 "GPUs; ILSVRC-2012 class folders in <data_dir>/imagenet (not downloadable)" if dataset == "imagenet"
                 else "CPU")
        lines.append(f"| `{name}` | {dataset} | {jobs} | {needs} | {summary} |")
    if not lines:
        return []
    return ["| experiment | dataset | jobs | needs | what |", "|---|---|---|---|---|", *lines]


def _first_sentence(path: Path) -> str:
    """The first sentence of an experiment file's header comment (what it reproduces)."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if "@package" not in line:
            header.append(line.lstrip("# ").strip())
    text = " ".join(header)
    return re.split(r"(?<!al\.)(?<=\.)\s", text, maxsplit=1)[0] if text else ""  # not after "et al."


def _default_choice(conf, group: str) -> str | None:
    """The option an experiment file picks for a config group (`- override /dataset: cifar100`)."""
    for item in conf.get("defaults") or []:
        if hasattr(item, "items"):
            for key, value in item.items():
                if key.split()[-1].lstrip("/") == group:
                    return str(value)
    return None


def publish(results: Path = RESULTS, paper_dir: Path | None = None) -> str:
    """Regenerate every table's leaderboard and plot, and results/README.md; return the README text."""
    paper_dir = paper_dir or PAPER_DIR
    paper = load_paper(paper_dir)
    parts = ["# kdbench results",
             "",
             "Generated by `python -m kdbench.publish` from the run records committed under `results/<table>/records/`; "
             "do not edit by hand. Every number below is the mean ± std over the listed seeds (n), last epoch and "
             "best epoch; the paper columns compare in the paper's own protocol and metric, with the tolerance "
             "max(2·std, dataset floor) (see `kdbench/report.py`). Published numbers: `kdbench/paper/`.",
             ""]
    ran: set[str] = set()
    for table in tables(results):
        records = _raw_records(table)
        ran |= _experiments(records)
        build_report([table / "records"], table, paper_dir, title=f"kdbench — {table.name}")
        board = leaderboard(load_records([table / "records"]), paper)
        has_plot = plot_vs_paper(board, table / PLOT, f"{table.name}: ours vs paper")
        parts += [f"## {table.name}", ""]
        if (table / NOTES).exists():  # the people's reading of the numbers below: what differs and what was tried
            parts += [(table / NOTES).read_text().strip(), ""]
        cmds = _commands(records)
        if cmds:
            parts += ["Commands (as recorded):", "", "```", *cmds, "```", ""]
        parts += [*_provenance(records), ""]
        if board.empty:
            parts += ["_no completed runs_", ""]
        else:  # two tables, so that neither wraps at a page's width
            ours, compared = split_table(display_table(board))
            parts += [to_markdown(ours), ""]
            if compared is not None and not compared.empty:
                parts += ["Compared with the papers' cells (the paper's metric and protocol; ✓ within the tolerance):",
                          "", to_markdown(compared.drop(columns=["dataset"]) if compared["dataset"].nunique() == 1
                                          and ours["dataset"].nunique() == 1 else compared), ""]
        for name, grid in paper_tables(board):
            parts += [f"### {name} (ours / paper)", "", to_markdown(grid), ""]
        if has_plot:
            parts += [f"![{table.name}: ours vs paper]({table.name}/{PLOT})", ""]
        parts += [f"Files: [`{table.name}/leaderboard.csv`]({table.name}/leaderboard.csv), "
                  f"[records]({table.name}/records/).", ""]
    pending = _configured_not_run(ran)
    if pending:
        parts += ["## Configured, not yet run here", "",
                  "Each reproduces a published table with its recipe (`kdbench experiment=<name>`; "
                  "`kdbench experiment=<name> dry_run=true` lists the jobs and their cost). They need the dataset "
                  "and, at CIFAR scale, a GPU.", "", *pending, ""]
    text = "\n".join(parts)
    (results / README).write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdbench.publish", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results dir (default: the repo's)")
    sub = parser.add_subparsers(dest="command")
    c = sub.add_parser("collect", help="copy run records into results/<table>/records/")
    # Accepted after `collect` too; SUPPRESS keeps the subparser from resetting a --results given before it.
    c.add_argument("--results", type=Path, default=argparse.SUPPRESS, help="the results dir (default: the repo's)")
    c.add_argument("table")
    c.add_argument("dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.command == "collect":
        missing = [str(d) for d in args.dirs if not d.exists()]
        if missing:
            parser.error(f"no such directory: {', '.join(missing)}")
        copied = collect(args.table, args.dirs, args.results)
        print(f"copied {len(copied)} records into {args.results / args.table / 'records'}")
        return 0
    publish(args.results)
    print(f"wrote {args.results / README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
