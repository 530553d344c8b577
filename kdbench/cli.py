"""`kdbench [overrides]` runs jobs from the Hydra config tree in conf/; `kdbench report DIR...` builds a leaderboard;
`kdbench list|teachers|export ...` and `kdbench --help` are kdbench's own commands (kdbench.commands, store_cli,
export); `kdbench --hydra-help` is Hydra's.

The primary config is itself a multirun (the digits demo sweep), so every invocation writes a sweep dir and
ends with its leaderboard. A failing job records status `failed` and the sweep goes on; the exit code is 1
when any job failed.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
from datetime import datetime
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kdbench.config import CONF_DIR, check_experiment_names, check_launcher, register_configs
from kdbench.errors import KDBenchError
from kdbench.io import RESULTS_SETTING, ensure_writable_dir

log = logging.getLogger("kdbench")
# Where this invocation's jobs write (the sweep dir, or the run dir of a single run): set when a job starts, read
# when Ctrl-C stops the sweep (its leaderboard so far and the command that resumes it).
_where: dict = {}
# The folders of the jobs that did not complete, from this process (in-process launchers) and from the records the
# sweep left (launchers that run jobs elsewhere). A set: one job may be seen both ways.
_sweep_failures: set[str] = set()

# One name per invocation for its output folder, `<time>_<id>`, so two sweeps started in the same second never share a
# folder. main() mints it and launcher workers inherit it through the environment (the default here serves the
# compose API: tests, notebooks). The processes of one torchrun job share torchrun's run id instead, so they agree
# on the folder whenever each started.
def _run_name() -> str:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and run_id != "none":
        return f"torchrun_{run_id}"
    return os.environ["KDBENCH_RUN"]


def _mint_run_name() -> None:
    os.environ["KDBENCH_RUN"] = f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{secrets.token_hex(3)}"


if "KDBENCH_RUN" not in os.environ:
    _mint_run_name()
if not OmegaConf.has_resolver("kdbench_run"):
    OmegaConf.register_new_resolver("kdbench_run", _run_name)
register_configs()


class Terminated(KeyboardInterrupt):
    """SIGTERM (a timeout, a scheduler's preemption): ends the job like Ctrl-C, its record says `interrupted`."""


class ReportCallback(Callback):
    """Print and save the sweep's leaderboard, with the rows of the stored teachers its jobs used, when a multirun
    ends (a dry run's totals instead)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from kdbench.distributed import world

        if not world().main:  # the first process of a distributed job reports
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        if config.get("dry_run"):
            from kdbench.plan import format_totals, load_plans

            plans = load_plans(sweep_dir)
            print("\n" + format_totals(plans, config.dry_run_tflops))
            _sweep_failures.update(str(p["job"]) for p in plans if "error" in p)
            return
        from kdbench.record import ATTEMPT_FILE
        from kdbench.report import build_report, load_records, teacher_records

        teachers = teacher_records([sweep_dir])
        print("\n" + build_report([sweep_dir, *teachers], sweep_dir, title=f"kdbench leaderboard — {sweep_dir}"))
        print(f"\n(records and leaderboard.md/.csv/.html in {sweep_dir})")
        records = load_records([sweep_dir])
        _sweep_failures.update(str(Path(p).resolve()) for p in records.loc[records["status"] != "completed", "path"])
        _sweep_failures.update(str(p.parent.resolve()) for p in sweep_dir.rglob(ATTEMPT_FILE))  # failed re-runs


def _keep_failure(cfg: DictConfig, out_dir: Path, overrides, err: BaseException) -> None:
    """A failure before the job's record existed (a bad option, a refused resume) still gets a record."""
    from kdbench.job import labels_of
    from kdbench.record import record_failure

    if getattr(err, "kdbench_recorded", False):
        return
    try:
        labels = labels_of(cfg)
    except Exception:  # noqa: BLE001  (the labels themselves may be what is broken)
        labels = {}
    try:
        record_failure(out_dir, err, labels=labels, seed=cfg.get("seed"), overrides=overrides)
    except KDBenchError as unwritable:
        log.error("%s", unwritable)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _job(cfg: DictConfig):
    from kdbench.job import resolve, run

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    number = hc.job.num if multirun else None
    _where.update(dir=str(Path(hc.sweep.dir if multirun else hc.runtime.output_dir).resolve()), multirun=multirun)
    overrides = tuple(hc.overrides.task)
    try:
        if cfg.dry_run:
            from kdbench.plan import dry_run_failed, dry_run_job, format_totals

            try:
                plan = dry_run_job(resolve(cfg, overrides), out_dir, number, cfg.dry_run_tflops)
            except Exception as err:
                dry_run_failed(out_dir, number, err)
                raise
            if not multirun:
                print(format_totals([plan], cfg.dry_run_tflops))
            return None
        record = run(resolve(cfg, overrides), out_dir)
    except Exception as err:
        from kdbench.distributed import world

        if not world().main:
            raise  # torchrun ends the job; the first rank records this rank's error (kdbench.job.train_job)
        if not cfg.dry_run:
            _keep_failure(cfg, out_dir, overrides, err)
        _sweep_failures.add(str(out_dir.resolve()))
        if not multirun and not isinstance(err, KDBenchError):
            raise  # a bug, not bad input: its traceback helps
        detail = str(err) if isinstance(err, KDBenchError) else f"{type(err).__name__}: {err}"
        where = "plan.json" if cfg.dry_run else "record"
        log.error("job%s failed: %s (%s kept in %s)", f" {number}" if multirun else "", detail, where, out_dir)
        return None
    return record["last_top1"]


def _terminated(signum, frame):
    raise Terminated(f"terminated by signal {signum}")


def _results_root(argv: list[str]) -> Path:
    """The results root this invocation writes under: paths.root=... on the command line, else KDBENCH_RESULTS,
    else ./outputs (conf/paths/default.yaml)."""
    for arg in argv:
        if arg.split("=", 1)[0].lstrip("+") == "paths.root" and "=" in arg and "," not in arg:
            return Path(arg.split("=", 1)[1]).expanduser()
    return Path(os.environ.get("KDBENCH_RESULTS", "./outputs")).expanduser()


def _resume_command(argv: list[str], where: dict) -> str:
    """The command that finishes an interrupted invocation: the same arguments, in the same folder (finished jobs
    keep their records, the interrupted one continues from its last checkpointed epoch)."""
    import shlex

    key = "hydra.sweep.dir" if where.get("multirun") else "hydra.run.dir"
    args = [a for a in argv if not a.startswith(f"{key}=")]
    if not where.get("multirun") and not any(a.startswith("hydra.mode=") for a in args):
        args.append("hydra.mode=RUN")
    return " ".join(["kdbench", *map(shlex.quote, args), shlex.quote(f"{key}={where['dir']}")])


def _sweep_dir_of(argv: list[str]) -> dict:
    """Where this invocation wrote, when no job got as far as saying so (a launcher that runs jobs elsewhere)."""
    if _where:
        return dict(_where)
    for arg in argv:
        if arg.startswith(("hydra.sweep.dir=", "hydra.run.dir=")):
            return {"dir": str(Path(arg.split("=", 1)[1]).resolve()), "multirun": arg.startswith("hydra.sweep")}
    found = sorted(_results_root(argv).glob(f"multirun/*_{os.environ['KDBENCH_UID']}"))
    return {"dir": str(found[-1].resolve()), "multirun": True} if found else {}


def _report_interrupted(argv: list[str], how: str) -> None:
    """After Ctrl-C or SIGTERM: the leaderboard of the jobs that finished, and the exact command that resumes."""
    where = _sweep_dir_of(argv)
    print(f"\nkdbench: stopped by {how}; the running job's record says interrupted and keeps its finished epochs.",
          file=sys.stderr, flush=True)
    if not where:
        print("kdbench: no job had started; run the same command again.", file=sys.stderr)
        return
    folder = Path(where["dir"])
    try:
        from kdbench.report import build_report, load_records, teacher_records

        records = load_records([folder])
        if (records["status"] == "completed").any():
            print("\n" + build_report([folder, *teacher_records([folder])], None,
                                       title=f"finished jobs — {folder}"), flush=True)
        else:
            print(f"kdbench: no job of {folder} had finished.", file=sys.stderr)
    except Exception as err:  # noqa: BLE001  (a report problem must not hide the resume command)
        print(f"kdbench: could not build the leaderboard of {folder}: {err}", file=sys.stderr)
    print(f"kdbench: resume with (finished jobs are kept, the interrupted one continues from its last epoch):\n"
          f"  {_resume_command(argv, where)}", file=sys.stderr, flush=True)


def main() -> None:
    # SIGTERM (timeout, Slurm preemption) ends a job like Ctrl-C: its record says "interrupted", epochs kept.
    signal.signal(signal.SIGTERM, _terminated)
    _mint_run_name()
    argv = sys.argv[1:]
    if argv and argv[0] == "report":
        from kdbench.report import main as report_main

        sys.exit(report_main(argv[1:]))
    if argv and argv[0] == "list":
        from kdbench.commands import list_main

        sys.exit(list_main(argv[1:]))
    if argv and argv[0] == "teachers":
        from kdbench.store_cli import main as teachers_main

        sys.exit(teachers_main(argv[1:]))
    if argv and argv[0] == "export":
        from kdbench.export import main as export_main

        sys.exit(export_main(argv[1:]))
    if any(a in ("--help", "-h") for a in argv):
        from kdbench.commands import help_text

        print(help_text())
        sys.exit(0)
    if any(a in ("--cfg", "-c") for a in argv):
        from kdbench.commands import sweep_note

        print(sweep_note(argv), flush=True)
    try:
        check_experiment_names(argv)
        check_launcher(argv)
        if not any(a.startswith(("-", "hydra.sweep.dir=", "hydra.run.dir=")) for a in argv):
            ensure_writable_dir(_results_root(argv), RESULTS_SETTING)  # before any job starts, in one line
    except KDBenchError as err:
        print(f"kdbench: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        _job()
    except KeyboardInterrupt as err:
        how, code = ("SIGTERM", 143) if isinstance(err, Terminated) else ("Ctrl-C", 130)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the summary short
        _report_interrupted(argv, how)
        sys.exit(code)
    if _sweep_failures:
        print(f"kdbench: {len(_sweep_failures)} job(s) did not complete; see their metrics.json "
              "(plan.json in a dry run)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    # `python -m kdbench.cli` runs this file as __main__, and Hydra imports kdbench.cli again for its callback: run
    # the imported module's main, so that the failures the callback counts are the ones main() checks.
    from kdbench.cli import main as _main

    _main()
