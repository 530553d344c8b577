"""`kdbench [overrides]` runs jobs from the Hydra config tree in conf/; `kdbench report DIR...` builds a leaderboard.

The primary config is itself a multirun (the digits demo sweep), so every invocation writes a sweep dir and
ends with its leaderboard. A failing job records status `failed` and the sweep goes on; the exit code is 1
when any job failed.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kdbench.config import CONF_DIR, check_experiment_names, register_configs
from kdbench.errors import KDBenchError

log = logging.getLogger("kdbench")
_sweep_failures: list[str] = []

# One id per invocation, so two sweeps started in the same second never share a directory. main() mints it and
# launcher workers inherit it through the environment; the default here serves the compose API (tests, notebooks).
os.environ.setdefault("KDBENCH_UID", secrets.token_hex(3))
if not OmegaConf.has_resolver("kdbench_uid"):
    OmegaConf.register_new_resolver("kdbench_uid", lambda: os.environ["KDBENCH_UID"])
register_configs()


class ReportCallback(Callback):
    """Print and save the sweep's leaderboard, with the rows of the stored teachers its jobs used, when a multirun
    ends (a dry run's totals instead)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if config.get("dry_run"):
            from kdbench.plan import format_totals, load_plans

            plans = load_plans(sweep_dir)
            print("\n" + format_totals(plans, config.dry_run_tflops))
            _sweep_failures.extend(str(p["job"]) for p in plans if "error" in p)
            return
        from kdbench.report import build_report, load_records, teacher_records

        teachers = teacher_records([sweep_dir])
        print("\n" + build_report([sweep_dir, *teachers], sweep_dir, title=f"kdbench leaderboard — {sweep_dir}"))
        print(f"\n(records and leaderboard.md/.csv/.html in {sweep_dir})")
        records = load_records([sweep_dir])
        _sweep_failures.extend(records.loc[records["status"] != "completed", "path"])


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _job(cfg: DictConfig):
    from kdbench.job import resolve, run

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    number = hc.job.num if multirun else None
    try:
        if cfg.dry_run:
            from kdbench.plan import dry_run_failed, dry_run_job, format_totals

            try:
                plan = dry_run_job(resolve(cfg, tuple(hc.overrides.task)), out_dir, number, cfg.dry_run_tflops)
            except Exception as err:
                dry_run_failed(out_dir, number, err)
                raise
            if not multirun:
                print(format_totals([plan], cfg.dry_run_tflops))
            return None
        record = run(resolve(cfg, tuple(hc.overrides.task)), out_dir)
    except Exception as err:
        if not multirun:
            raise
        detail = str(err) if isinstance(err, KDBenchError) else f"{type(err).__name__}: {err}"
        log.error("job %s failed: %s (record kept in %s)", hc.job.num, detail, out_dir)
        return None
    return record["last_top1"]


def _terminated(signum, frame):
    raise KeyboardInterrupt(f"terminated by signal {signum}")


def main() -> None:
    # SIGTERM (timeout, Slurm preemption) ends a job like Ctrl-C: its record says "interrupted", epochs kept.
    signal.signal(signal.SIGTERM, _terminated)
    os.environ["KDBENCH_UID"] = secrets.token_hex(3)
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from kdbench.report import main as report_main

        sys.exit(report_main(sys.argv[2:]))
    try:
        check_experiment_names(sys.argv[1:])
    except KDBenchError as err:
        print(f"kdbench: {err}", file=sys.stderr)
        sys.exit(2)
    _job()
    if _sweep_failures:
        print(f"kdbench: {len(_sweep_failures)} job(s) did not complete; see their metrics.json "
              "(plan.json in a dry run)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
