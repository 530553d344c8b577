"""Nothing lost, nothing silently wrong: faults and bad input, driven through the command line where a user meets
them. Each test names the failure it guards against (the issue's list: failures before a record exists, '+' keys,
unwritable folders, out-of-range settings, unreadable records and paper rows, re-runs of finished or changed jobs,
file modes, how kdbench is started, signals, incompatible pairs, checkpoints, stale records)."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdbench.record import effective_status
from kdbench.report import load_paper, load_records
from tests.conftest import KDBENCH, kdbench_cli, resolve_job

FAST = ["trainer.epochs=1", "trainer.progress=false"]


def _records(root: Path, name: str = "metrics.json") -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob(name))]


def _one_line_error(out: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr[-3000:]


# ----------------------------------------------------------------------------- failures are counted and recorded


def test_a_job_that_fails_before_its_record_exists_is_recorded_and_fails_the_sweep(tmp_path):
    out = kdbench_cli(tmp_path, "method=vanilla", "method.name=nosuch", "seed=1", *FAST)
    assert out.returncode == 1 and "did not complete" in out.stderr
    (rec,) = _records(tmp_path / "multirun")
    assert rec["status"] == "failed" and "unknown method 'nosuch'" in rec["error"]


@pytest.mark.parametrize("override, hint", [("+trainer.epoch=3", "did you mean 'trainer.epochs'"),
                                            ("+optim.mommentum=0.8", "did you mean 'optim.momentum'"),
                                            ("+method.temprature=2", "did you mean 'method.temperature'")])
def test_a_key_added_with_plus_that_no_schema_or_method_knows_is_rejected_naming_the_closest(tmp_path, override, hint):
    out = kdbench_cli(tmp_path, "method=kd", "teacher=mlp_32", "seed=1", override, *FAST)
    assert out.returncode == 1 and hint in out.stdout + out.stderr
    assert not (tmp_path / "teachers").exists()  # rejected before any teacher was trained


def test_a_weight_for_no_loss_term_is_an_error_in_the_first_step(run_job):
    from kdbench.errors import KDBenchError

    with pytest.raises(KDBenchError, match="weights names \\['kdd'\\]"):
        run_job("method=kd", "teacher=mlp_32", "+method.weights.kdd=1", *FAST)


def test_out_of_range_settings_are_refused_before_anything_trains(tmp_path):
    out = kdbench_cli(tmp_path, "method=vanilla", "seed=1", "trainer.progress=false",
                      "trainer.epochs=0,-1", "trainer.batch_size=0,-1")
    assert out.returncode == 1
    errors = sorted(rec["error"] for rec in _records(tmp_path / "multirun"))
    assert len(errors) == 4 and all("must be >= 1" in e for e in errors)
    assert all(rec["history"] == [] for rec in _records(tmp_path / "multirun"))
    assert not list((tmp_path / "multirun").rglob("checkpoint.pt"))


# ----------------------------------------------------------------------------- folders that cannot be written


def test_an_unwritable_results_root_is_one_line_before_any_job(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = kdbench_cli(tmp_path, "method=vanilla", "seed=1", *FAST, env={"KDBENCH_RESULTS": str(blocker / "out")})
    assert out.returncode == 2 and "paths.root" in out.stderr and "KDBENCH_RESULTS" in out.stderr
    _one_line_error(out)
    out = kdbench_cli(tmp_path, "method=vanilla", "seed=1", f"paths.root={blocker / 'out'}", *FAST)
    assert out.returncode == 2 and "paths.root" in out.stderr


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_a_stored_teacher_is_read_without_writing_to_the_store_and_an_unwritable_store_names_its_setting(tmp_path):
    store = tmp_path / "store"
    first = kdbench_cli(tmp_path, "method=kd", "teacher=mlp_32", "seed=1", f"paths.teacher_store={store}", *FAST)
    assert first.returncode == 0, first.stderr[-2000:]
    for lock in store.rglob(".lock"):
        lock.unlink()  # as if the store had been copied in read-only
    before = _snapshot(store)
    again = kdbench_cli(tmp_path, "method=kd", "teacher=mlp_32", "seed=2", f"paths.teacher_store={store}", *FAST)
    assert again.returncode == 0 and "found in the store" in again.stdout
    assert _snapshot(store) == before  # nothing written, not even a lock



def test_a_store_that_cannot_be_written_is_named_by_its_own_setting(tmp_path):
    from kdbench.errors import OutputNotWritable
    from kdbench.job import run

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OutputNotWritable) as err:
        run(resolve_job(["method=kd", "teacher=mlp_32", *FAST], tmp_path, teacher_store=blocker / "t"), tmp_path / "j")
    assert "paths.teacher_store" in str(err.value) and "paths.root" not in str(err.value)


# ----------------------------------------------------------------------------- reading records and paper rows


def test_the_report_skips_unreadable_records_with_a_warning(tmp_path, capsys):
    good = tmp_path / "good"
    good.mkdir()
    (good / "metrics.json").write_text(json.dumps({"status": "completed", "dataset": "digits", "student": "mlp_32",
                                                   "method": "vanilla", "seed": 1, "last_top1": 90.0,
                                                   "best_top1": 91.0, "overrides": []}))
    for name, content in (("latin1", "café".encode("latin-1")), ("list", b"[1, 2]"), ("truncated", b'{"status": ')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_bytes(content)
    records = load_records([tmp_path])
    assert list(records["seed"]) == [1]
    err = capsys.readouterr().err
    assert all(f"{name}/metrics.json" in err for name in ("latin1", "list", "truncated"))
    out = subprocess.run([*KDBENCH, "report", str(tmp_path), "--out", str(tmp_path / "rep")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "| digits |" in out.stdout


def test_a_malformed_paper_row_is_skipped_naming_its_file_and_line(tmp_path, capsys):
    head = "paper,table,dataset,teacher,student,method,metric,value,protocol,runs,source\n"
    (tmp_path / "P.csv").write_text(head + "P,T,mnist,,mlp_800x2,vanilla,test_errors,146,last,1,src\n"
                                    + "P,T,mnist,,mlp_800x2,kd,test_errors,seventy,last,1,src\n"
                                    + "P,T,mnist,,mlp_800x2,kd,test_errors,74,last\n"
                                    + "P,T,mnist,mlp_1200x2,mlp_800x2,kd,test_errors,74,last,1,src\n")
    paper = load_paper(tmp_path)
    assert list(paper["value"]) == [146.0, 74.0]
    err = capsys.readouterr().err
    assert f"{tmp_path / 'P.csv'} line 3" in err and f"{tmp_path / 'P.csv'} line 4" in err


def test_a_record_left_running_by_a_dead_process_reads_as_interrupted():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    mine = {"status": "running", "host": socket.gethostname(), "pid": dead.pid, "updated_at": "2099-01-01T00:00:00+00:00"}
    assert effective_status(mine) == "interrupted"
    assert effective_status({**mine, "pid": os.getpid()}) == "running"
    elsewhere = {"status": "running", "host": "another-machine", "started_at": "2026-11-30T17:05:34+00:00",
                 "wall_time_s": 10.0}
    assert effective_status(elsewhere, now=time.time()) == "interrupted"


def test_the_published_leaderboard_shows_no_running_record_and_no_absolute_path():
    from tests.conftest import REPO

    text = (REPO / "results" / "hinton_mnist" / "leaderboard.md").read_text()
    assert "| running |" not in text and "/work/" not in text and "/tmp/" not in text


# ----------------------------------------------------------------------------- re-running a job in its folder


def _job_dir(tmp_path: Path) -> Path:
    (job,) = [p.parent for p in (tmp_path / "multirun").glob("*/0/metrics.json")]
    return job


def test_a_finished_job_run_again_keeps_its_record_and_provenance(tmp_path):
    args = ["method=vanilla", "seed=1", *FAST]
    assert kdbench_cli(tmp_path, *args).returncode == 0
    job = _job_dir(tmp_path)
    before = json.loads((job / "metrics.json").read_text())
    again = kdbench_cli(tmp_path, *args, f"hydra.sweep.dir={job.parent}")
    assert again.returncode == 0 and "already holds this job's completed record" in again.stdout
    after = json.loads((job / "metrics.json").read_text())
    for key in ("started_at", "finished_at", "wall_time_s", "history", "pid"):
        assert after[key] == before[key], key


def test_a_changed_configuration_is_refused_in_the_old_runs_folder(tmp_path):
    assert kdbench_cli(tmp_path, "method=vanilla", "seed=1", "optim.lr=0.05", *FAST).returncode == 0
    job = _job_dir(tmp_path)
    before = (job / "metrics.json").read_text()
    out = kdbench_cli(tmp_path, "method=vanilla", "seed=1", "optim.lr=0.2", *FAST, f"hydra.sweep.dir={job.parent}")
    assert out.returncode == 1 and "trainer.resume=false" in out.stdout + out.stderr
    assert (job / "metrics.json").read_text() == before  # the finished record is untouched
    attempt = json.loads((job / "attempt.json").read_text())
    assert attempt["status"] == "failed" and "another configuration" in attempt["error"]


def test_starting_fresh_in_a_folder_replaces_its_record_once_the_new_run_completes(run_job, tmp_path):
    run_job("method=vanilla", "optim.lr=0.05", *FAST, name="job")
    rec = run_job("method=vanilla", "optim.lr=0.2", *FAST, "trainer.resume=false", name="job")
    assert rec["config"]["optim"]["lr"] == 0.2 and rec["status"] == "completed"
    assert json.loads((tmp_path / "job" / "metrics.json").read_text())["config"]["optim"]["lr"] == 0.2
    assert not (tmp_path / "job" / "attempt.json").exists()


def test_the_checkpoint_refuses_a_changed_configuration_even_without_its_record(run_job, tmp_path):
    from kdbench.errors import ConfigChanged

    run_job("method=vanilla", "trainer.epochs=2", "trainer.progress=false", name="job")
    (tmp_path / "job" / "metrics.json").unlink()
    with pytest.raises(ConfigChanged, match="trainer.resume=false"):
        run_job("method=vanilla", "trainer.epochs=2", "trainer.progress=false", "optim.lr=0.2", name="job")


def test_a_failed_attempt_never_overwrites_a_finished_record(tmp_path):
    args = ["method=kd", "teacher=mlp_32", "seed=1", *FAST]
    assert kdbench_cli(tmp_path, *args).returncode == 0
    job = _job_dir(tmp_path)
    before = (job / "metrics.json").read_text()
    (weights,) = (tmp_path / "teachers").glob("*/teacher.pt")
    weights.write_bytes(weights.read_bytes()[:-4] + b"xxxx")  # tampered
    out = kdbench_cli(tmp_path, *args, "trainer.resume=false", f"hydra.sweep.dir={job.parent}")
    assert out.returncode == 1
    assert (job / "metrics.json").read_text() == before
    attempt = json.loads((job / "attempt.json").read_text())
    assert attempt["status"] == "failed" and "sha256" in attempt["error"]


# ----------------------------------------------------------------------------- files


def test_written_files_follow_the_umask_not_0600(run_job, tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    run_job("method=kd", "teacher=mlp_32", *FAST)
    files = [*tmp_path.rglob("metrics.json"), *tmp_path.rglob("checkpoint.pt"), *tmp_path.rglob("teacher.pt"),
             *tmp_path.rglob("meta.json")]
    assert len(files) >= 5
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~umask}


# ----------------------------------------------------------------------------- every way of starting kdbench


def test_a_single_run_mode_error_is_one_line_and_exit_1(tmp_path):
    out = kdbench_cli(tmp_path, "hydra.mode=RUN", "method=vanilla", "seed=1", "trainer.epochs=0")
    assert out.returncode == 1 and "trainer.epochs must be >= 1" in out.stderr + out.stdout
    _one_line_error(out)


def test_python_dash_m_exits_1_when_a_job_failed(tmp_path):
    for module in ("kdbench.cli", "kdbench"):
        out = subprocess.run([sys.executable, "-m", module, "method=vanilla", "seed=1", "trainer.epochs=-1"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300,
                             env={**os.environ, "KDBENCH_RESULTS": str(tmp_path / module)})
        assert out.returncode == 1, (module, out.stderr[-2000:])


def test_sigterm_ends_with_exit_143_one_line_and_an_interrupted_record(tmp_path):
    proc = subprocess.Popen([*KDBENCH, "method=vanilla", "seed=1", "trainer.epochs=500", "trainer.progress=false"],
                            env={**os.environ, "KDBENCH_RESULTS": str(tmp_path)}, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("multirun/*/0/checkpoint.pt")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "SIGTERM" in err and "Traceback" not in err
    (rec,) = _records(tmp_path / "multirun")
    assert rec["status"] == "interrupted" and len(rec["history"]) >= 1


# ----------------------------------------------------------------------------- pairs and checkpoints


def test_an_incompatible_pair_is_refused_before_its_teacher_is_trained(tmp_path):
    out = kdbench_cli(tmp_path, "method=fsp", "teacher=resnet32x4", "student=resnet20", "seed=1", "dataset=synthetic",
                      "dataset.num_classes=10", "dataset.train_size=32", "dataset.test_size=16", *FAST)
    assert out.returncode == 1 and "not in the store" not in out.stdout
    (rec,) = _records(tmp_path / "multirun")
    assert "IncompatibleModels" in rec["error"] and "method 'fsp' cannot distill" in rec["error"]
    assert not list(tmp_path.rglob("teacher.pt"))


def test_a_teacher_checkpoint_of_another_architecture_names_the_file_and_the_model(tmp_path):
    from kdbench.models import create_model

    ckpt = tmp_path / "teacher.pth"
    torch.save({"model": create_model("mlp_32", 10, (1, 8, 8)).state_dict()}, ckpt)
    out = kdbench_cli(tmp_path, "method=kd", "teacher=mlp_800x2", f"teacher.checkpoint={ckpt}", "seed=1", *FAST)
    assert out.returncode == 1
    (rec,) = _records(tmp_path / "multirun")
    assert str(ckpt) in rec["error"] and "'mlp_800x2'" in rec["error"] and "teacher=<model>" in rec["error"]


def test_a_sigterm_while_a_failure_is_recorded_waits_until_the_record_is_written(tmp_path):
    """torchrun sends SIGTERM to the surviving ranks the moment one fails; rank 0 may be writing that failure then.
    The signal is held until the record is written, then its handler runs."""
    import os
    import signal

    from kdbench.record import RunRecord

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop

    record = RunRecord.start(tmp_path, config={}, config_hash="h", labels={}, seed=1, overrides=[])
    real_update, previous = record.update, signal.signal(signal.SIGTERM, stop)

    def update_interrupted_by_sigterm(**fields):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of recording the failure
        real_update(**fields)

    record.update = update_interrupted_by_sigterm
    try:
        with pytest.raises(Stop):  # delivered once the record is written
            record.fail(RuntimeError("connection closed by peer"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    written = json.loads(record.path.read_text())
    assert written["status"] == "failed" and "connection closed by peer" in written["error"]
