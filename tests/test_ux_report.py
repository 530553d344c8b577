"""Paper-ready output: n = 1 shows the value, teachers are labelled as teachers, numbers alone right-aligned in HTML,
the best of each block bold, Δ over the vanilla student, LaTeX (booktabs) exports, plots that fit their content,
results/README.md without machine paths and with tables split to fit a page; `kdbench report` leaves a sweep's own
files alone."""
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from kdbench.publish import RESULTS, portable, vs_paper_figure
from kdbench.report import (TEACHER_MARK, build_report, display_table, latex_escape, leaderboard, load_paper,
                            load_records, paper_tables, split_table, to_html, to_latex)
from tests.conftest import KDBENCH


def _record(root: Path, name: str, **fields) -> None:
    d = root / name
    d.mkdir(parents=True)
    rec = {"status": "completed", "dataset": "cifar100", "teacher": "resnet56", "student": "resnet20", "method": "kd",
           "seed": 1, "overrides": [], "n_test": 10000, **fields}
    (d / "metrics.json").write_text(json.dumps(rec))


@pytest.fixture
def runs(tmp_path):
    """kd (two seeds: 71, 73), dkd (one seed: 74), the student alone (two seeds: 69, 70) and the stored teacher."""
    root = tmp_path / "runs"
    _record(root, "kd1", last_top1=71.0, best_top1=71.5)
    _record(root, "kd2", seed=2, last_top1=73.0, best_top1=73.5)
    _record(root, "dkd1", method="dkd", last_top1=74.0, best_top1=74.0, overrides=["method.beta=8"])
    _record(root, "v1", teacher=None, method="vanilla", last_top1=69.0, best_top1=69.2)
    _record(root, "v2", teacher=None, method="vanilla", seed=2, last_top1=70.0, best_top1=70.2)
    _record(root, "t", teacher=None, student="resnet56", method="vanilla", seed=0, last_top1=72.5, best_top1=72.6,
            overrides=[TEACHER_MARK])
    return root


def _rows(table: pd.DataFrame) -> dict:
    return {(r["teacher"], r["student"], r["method"]): r for r in table.to_dict("records")}


def test_the_teacher_mark_is_the_one_job_writes():
    from kdbench.job import TEACHER_RECORD_MARK

    assert TEACHER_MARK == TEACHER_RECORD_MARK


def test_one_run_shows_its_value_and_n_without_a_spread(runs):
    rows = _rows(display_table(leaderboard(load_records([runs]))))
    dkd = rows[("resnet56", "resnet20", "dkd")]
    assert dkd["n"] == 1 and dkd["last top-1"] == "**74.00**" and "±" not in dkd["best top-1"]
    assert rows[("resnet56", "resnet20", "kd")]["last top-1"] == "72.00\u00a0±\u00a01.41"  # std of 71, 73 = √2


def test_teacher_rows_are_labelled_as_teachers(runs):
    rows = _rows(display_table(leaderboard(load_records([runs]))))
    teacher = rows[("resnet56", "—", "teacher (vanilla)")]
    assert teacher["last top-1"] == "72.50" and teacher["Δ vanilla"] == ""
    assert ("", "resnet20", "vanilla") in rows  # the student alone stays a student row


def test_the_best_student_of_each_pair_is_bold_and_teachers_never_are(runs):
    rows = _rows(display_table(leaderboard(load_records([runs]))))
    assert rows[("resnet56", "resnet20", "dkd")]["last top-1"] == "**74.00**"
    assert rows[("resnet56", "resnet20", "kd")]["best top-1"] == "72.50\u00a0±\u00a01.41"  # mean of 71.5, 73.5; dkd's 74.0 is best
    assert not rows[("resnet56", "—", "teacher (vanilla)")]["last top-1"].startswith("**")
    assert not rows[("", "resnet20", "vanilla")]["last top-1"].startswith("**")  # alone in its block


def test_delta_over_the_vanilla_student_is_each_mean_minus_the_student_alone(runs):
    rows = _rows(display_table(leaderboard(load_records([runs]))))
    # kd: 72.0 - 69.5; dkd's own option method.beta=8 does not change its baseline: 74.0 - 69.5
    assert rows[("resnet56", "resnet20", "kd")]["Δ vanilla"] == "+2.50"
    assert rows[("resnet56", "resnet20", "dkd")]["Δ vanilla"] == "+4.50"
    assert rows[("", "resnet20", "vanilla")]["Δ vanilla"] == ""


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self._open = [], None

    def handle_starttag(self, tag, attrs):
        if tag in ("td", "th"):
            self._open = [tag, dict(attrs).get("class", ""), ""]
        elif tag == "b" and self._open:
            self._open[2] += "<b>"

    def handle_data(self, data):
        if self._open:
            self._open[2] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._open:
            self.cells.append(tuple(self._open))
            self._open = None


def test_html_right_aligns_the_number_columns_only_and_bolds_the_best(runs):
    table = display_table(leaderboard(load_records([runs])))
    page = to_html(table, "t")
    assert ".num{text-align:right" in page and "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left" in page
    parser = _Cells()
    parser.feed(page)
    header = [text for tag, _, text in parser.cells if tag == "th"]
    classes = {text: css for tag, css, text in parser.cells if tag == "th"}
    assert {c for c, css in classes.items() if css == "num"} == {"n", "last top-1", "best top-1", "Δ vanilla"}
    body = [c for c in parser.cells if c[0] == "td"]
    rows = [body[i:i + len(header)] for i in range(0, len(body), len(header))]
    for row in rows:
        for column, (_, css, _) in zip(header, row):
            assert (css == "num") == (column in {"n", "last top-1", "best top-1", "Δ vanilla"})
    assert any(text == "<b>74.00" for _, _, text in body)


def test_latex_export_is_a_booktabs_table_with_escapes_and_bold():
    table = pd.DataFrame({"method": ["kd_v2", "dkd"], "n": [3, 1], "last top-1": ["**72.00\u00a0±\u00a01.41**", "70.00"],
                          "Δ vanilla": ["+2.50", "50%"]})
    tex = to_latex(table, "CIFAR-100 & more", "tab:x")
    lines = tex.splitlines()
    assert lines[lines.index(r"\toprule") - 1] == r"\begin{tabular}{lrrr}"
    assert r"\toprule" in lines and r"\midrule" in lines and r"\bottomrule" in lines
    assert r"\caption{CIFAR-100 \& more}" in lines and r"\label{tab:x}" in lines
    assert r"kd\_v2 & 3 & \textbf{72.00~$\pm$~1.41} & +2.50 \\" in lines
    assert r"dkd & 1 & 70.00 & 50\% \\" in lines
    assert r"method & n & last top-1 & $\Delta$ vanilla \\" in lines
    assert latex_escape("a→b ✓ ✗ {x}") == r"a$\to$b \checkmark $\times$ \{x\}"


def _paper_dir(tmp_path: Path) -> Path:
    paper = tmp_path / "paper"
    paper.mkdir(exist_ok=True)
    (paper / "P.csv").write_text(
        "paper,table,dataset,teacher,student,method,metric,value,protocol,runs,source\n"
        "P,T1,cifar100,resnet56,resnet20,kd,top1,70.66,last,1,src\n"
        "P,T1,cifar100,resnet56,resnet20,dkd,top1,71.97,last,1,src\n"
        "P,T1,cifar100,,resnet56,vanilla,top1,72.34,last,1,src\n")
    return paper


def test_paper_layout_tables_bold_the_best_label_teachers_and_export_to_latex(runs, tmp_path):
    board = leaderboard(load_records([runs]), load_paper(_paper_dir(tmp_path)))
    ((name, grid),) = paper_tables(board)
    rows = grid.set_index("method")
    assert list(grid.columns) == ["method", "resnet56 (teacher)", "resnet56→resnet20"]
    assert rows.loc["dkd (method.beta=8)", "resnet56→resnet20"] == "**74.00** / 71.97 ✗"  # +2.03 beyond the 0.5 floor
    assert rows.loc["kd", "resnet56→resnet20"] == "72.00 / 70.66 ✓"  # tol 2·1.41
    assert rows.loc["vanilla", "resnet56 (teacher)"] == "72.50 / 72.34 ✓"
    out = tmp_path / "out"
    build_report([runs], out, _paper_dir(tmp_path))
    tex = (out / "paper_tables.tex").read_text()
    assert r"\begin{tabular}{lrr}" in tex
    assert r"dkd (method.beta=8) &  & \textbf{74.00} / 71.97 $\times$ \\" in tex
    assert (out / "leaderboard.tex").read_text().startswith(r"\begin{table}[t]")
    # the Markdown splits our results from their comparison with the papers, each narrower than the whole
    md = (out / "leaderboard.md").read_text()
    assert "### Compared with the papers" in md and "### P: T1 (ours / paper)" in md
    ours, compared = split_table(display_table(board))
    assert len(ours.columns) == 9 and len(compared.columns) == 12
    assert "paper" not in ours and "last top-1" not in compared


def _hinton_board():
    return leaderboard(load_records([RESULTS / "hinton_mnist" / "records"]), load_paper())


def test_the_vs_paper_plot_fits_its_labels_and_gives_the_data_most_of_the_width():
    import matplotlib.pyplot as plt

    fig = vs_paper_figure(_hinton_board(), "hinton_mnist: ours vs paper")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    texts = [t for t in fig.findobj(plt.Text) if t.get_visible() and t.get_text().strip()]
    assert len(texts) > 20
    for text in texts:  # nothing clipped: every label, tick and title lies inside the figure
        box = text.get_window_extent(renderer)
        assert box.x0 >= -0.5 and box.y0 >= -0.5 and box.x1 <= width + 0.5 and box.y1 <= height + 0.5, text.get_text()
    for ax in fig.axes[:1]:
        data = ax.get_window_extent(renderer)
        assert data.width >= 0.5 * width  # the labels take less than half the width
        ticks = sorted((t.get_window_extent(renderer) for t in ax.get_yticklabels()), key=lambda b: -b.y1)
        assert all(upper.y0 >= lower.y1 - 0.5 for upper, lower in zip(ticks, ticks[1:]))  # labels do not overlap
        assert all(t.get_fontsize() >= 8 for t in ax.get_yticklabels())
    plt.close(fig)


def test_recorded_commands_name_no_machine_paths():
    assert portable("/work/hinton/root/multirun/2026-11-30_16-59-33_656e69") == "<results>/multirun/2026-11-30_16-59-33_656e69"
    assert portable("hydra.sweep.dir=/tmp/tmpsfi6_g4f/sweep") == "hydra.sweep.dir=<dir>/sweep"
    assert portable("teacher.checkpoint=~/ckpt/r56.pth") == "teacher.checkpoint=<dir>/r56.pth"
    assert portable("method=kd") == "method=kd" and portable("--cls") == "--cls"
    text = (RESULTS / "README.md").read_text()
    for block in re.findall(r"Commands \(as recorded\):\n\n```\n(.*?)```", text, flags=re.S):
        assert not re.search(r"(^|[\s=])(/|~)", block), block


def test_the_published_tables_fit_a_page_and_keep_mean_and_std_together():
    text = (RESULTS / "README.md").read_text()
    tables = [line for line in text.splitlines() if line.startswith("|")]
    assert tables and max(line.count("|") - 1 for line in tables) <= 12
    cells = [cell for line in tables if not line.startswith("| `") for cell in line.split("|") if "±" in cell]
    assert cells and all(re.fullmatch(r" \*{0,2}\d+\.\d\d\u00a0±\u00a0\d+\.\d\d\*{0,2} ", c) or c.strip().startswith("±")
                         for c in cells)


def test_report_prints_without_touching_a_sweeps_files_and_writes_only_to_out(runs, tmp_path):
    import os
    import subprocess

    (runs / "leaderboard.md").write_text("the sweep's own\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([*KDBENCH, "report", str(runs)], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "| cifar100 | resnet56 | resnet20 | dkd |" in out.stdout
    assert "teacher (vanilla)" in out.stdout and "--out" in out.stdout
    assert (runs / "leaderboard.md").read_text() == "the sweep's own\n"
    assert sorted(p.name for p in runs.iterdir() if p.is_file()) == ["leaderboard.md"]
    out = subprocess.run([*KDBENCH, "report", str(runs), "--out", str(tmp_path / "rep")], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0
    assert {p.name for p in (tmp_path / "rep").iterdir()} >= {"leaderboard.md", "leaderboard.csv", "leaderboard.html",
                                                              "leaderboard.tex"}
