"""results/README.md is generated from committed records: tables, provenance, paper diff, plot, pending tables."""
import json

import pytest

from kdbench.publish import collect, main, publish


def _record(d, seed, top1, **fields):
    d.mkdir(parents=True)
    rec = {"status": "completed", "dataset": "mnist", "teacher": "mlp_1200x2", "student": "mlp_800x2", "method": "kd",
           "seed": seed, "overrides": ["experiment=hinton_mnist", f"seed={seed}"], "n_test": 10000,
           "last_top1": top1, "best_top1": top1, "argv": ["/x/.venv/bin/kdbench", "experiment=hinton_mnist"],
           "versions": {"torch": "2.14.1"}, "git_sha": "abcdef123", "started_at": "2026-11-23T14:00:00+00:00",
           "device": "cpu", "hardware": {"cpu": "AMD EPYC", "cpu_count": 2, "torch_threads": 2, "gpu": None}, **fields}
    (d / "metrics.json").write_text(json.dumps(rec))
    (d / "checkpoint.pt").write_bytes(b"weights")


def test_collect_and_publish(tmp_path):
    runs = tmp_path / "sweep"
    _record(runs / "0", 1, 99.20)
    _record(runs / "1", 2, 99.30)
    results = tmp_path / "results"
    (results / "paper").mkdir(parents=True)
    (results / "paper" / "P.csv").write_text(
        "paper,table,dataset,teacher,student,method,metric,value,protocol,runs,source\n"
        "Hinton2015,s3,mnist,mlp_1200x2,mlp_800x2,kd,test_errors,74,last,1,src\n")
    copied = collect("hinton_mnist", [runs], results)
    assert len(copied) == 2 and not list((results / "hinton_mnist").rglob("checkpoint.pt"))  # records only
    (results / "hinton_mnist" / "notes.md").write_text("We tried a longer teacher.\n")

    text = publish(results)
    assert text == (results / "README.md").read_text()
    assert "## hinton_mnist\n\nWe tried a longer teacher.\n" in text and "kdbench experiment=hinton_mnist" in text
    assert "AMD EPYC (2 cores, 2 torch threads)" in text and "git abcdef1" in text and "torch 2.14.1" in text
    # (100 - 99.25)% of 10000 = 75 errors vs the paper's 74
    assert "| mnist | mlp_1200x2 | mlp_800x2 | kd |" in text and "| 75.00 | +1.00 |" in text
    assert (results / "hinton_mnist" / "vs_paper.png").read_bytes()[:4] == b"\x89PNG"
    assert (results / "hinton_mnist" / "leaderboard.csv").exists()
    # experiments with no records are listed as configured-but-not-run; hinton_mnist ran, so it is not
    pending = text.split("## Configured, not yet run here")[1]
    assert "`crd_cifar100_same`" in pending and "`hinton_mnist`" not in pending


@pytest.mark.parametrize("before", [True, False])
def test_collect_command_writes_into_the_given_results_dir(tmp_path, before):
    """`--results` is honoured whether it comes before or after `collect` (argparse parents reset it otherwise)."""
    _record(tmp_path / "sweep" / "0", 1, 99.20)
    results = tmp_path / "results"
    args = ["collect", "hinton_mnist", str(tmp_path / "sweep")]
    main(["--results", str(results), *args] if before else [*args, "--results", str(results)])
    assert (results / "hinton_mnist" / "records" / "sweep" / "0" / "metrics.json").exists()


def test_committed_results_readme_is_what_publish_generates(tmp_path):
    """results/README.md and each table's leaderboard.csv are regenerated from the committed records, not edited."""
    import shutil

    from kdbench.publish import RESULTS

    copy = tmp_path / "results"
    shutil.copytree(RESULTS, copy)
    text = publish(copy)
    assert text == (RESULTS / "README.md").read_text()
    for table in RESULTS.iterdir():
        if (table / "records").is_dir():
            assert (copy / table.name / "leaderboard.csv").read_text() == (table / "leaderboard.csv").read_text()
