"""A Hydra launcher that trains a sweep's jobs in cohorts (kdbench.cohort): jobs that see the same batches train
together, one teacher forward per batch, each with its own record. Each job gets its output folder and `.hydra/`
files as under Hydra's basic launcher; then the jobs are grouped and each cohort runs here (`executor: inline`) or
as one submitit job (`executor: local | slurm`, parameters under `submitit`: timeout_min, gpus_per_node, partition,
...). Jobs that cannot share (kdbench.cohort.alone_reason) run alone. A dry run plans each job as usual and then
lists the cohorts and what sharing the teacher saves.

    kdbench -m hydra/launcher=cohort method=kd,dkd,crd seed=1
    kdbench -m hydra/launcher=cohort_slurm hydra.launcher.submitit.partition=<p> experiment=crd_cifar100_same
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class CohortLauncherConf:
    _target_: str = "hydra_plugins.kdbench_cohort_launcher.cohort_launcher.CohortLauncher"
    executor: str = "inline"  # inline: in this process | local | slurm: one submitit job per cohort
    submitit: Dict[str, Any] = field(default_factory=dict)  # submitit executor parameters (timeout_min, partition, ...)


ConfigStore.instance().store(group="hydra/launcher", name="cohort", node=CohortLauncherConf, provider="kdbench")


def _collect(cfg: DictConfig):
    """The task function of the first pass: the job's config, folder and overrides, nothing trained."""
    hc = HydraConfig.get()
    return {"cfg": cfg, "out_dir": Path(hc.runtime.output_dir), "overrides": tuple(hc.overrides.task),
            "num": hc.job.num}


def run_units(units: list) -> list:
    """Run cohorts (lists of (Job, out_dir)) one after another; each job's result is its top-1 or the error text.
    A submitit job runs this."""
    from kdbench.cohort import run_cohort
    from kdbench.job import run
    from kdbench.record import record_failure

    out = []
    for items in units:
        if len(items) == 1:
            job, out_dir = items[0]
            try:
                results = [run(job, out_dir)]
            except Exception as err:  # noqa: BLE001  (recorded in the job's record already)
                results = [err]
        else:
            results = run_cohort(items)
        for (job, out_dir), result in zip(items, results):
            if isinstance(result, BaseException) and not getattr(result, "kdbench_recorded", False):
                record_failure(out_dir, result, labels=job.labels, seed=job.seed, overrides=job.overrides)
        out.append([r.get("last_top1") if isinstance(r, dict) else f"{type(r).__name__}: {r}" for r in results])
    return out


class CohortLauncher(Launcher):
    def __init__(self, executor: str = "inline", submitit: Optional[Dict[str, Any]] = None) -> None:
        self.executor = executor
        self.submitit_params = dict(submitit or {})
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _each_job(self, job_overrides, initial_job_idx: int, task_function) -> List[JobReturn]:
        returns = []
        for idx, overrides in enumerate(job_overrides):
            idx = initial_job_idx + idx
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            returns.append(run_job(hydra_context=self.hydra_context, task_function=task_function,
                                   config=sweep_config, job_dir_key="hydra.sweep.dir",
                                   job_subdir_key="hydra.sweep.subdir"))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return returns

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from kdbench import cli
        from kdbench.cohort import alone_reason, group
        from kdbench.errors import KDBenchError
        from kdbench.job import resolve

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs in cohorts ({self.executor})")
        if self.config.get("dry_run"):
            returns = self._each_job(job_overrides, initial_job_idx, self.task_function)
            _print_cohorts(self.config, [r.cfg for r in returns], [tuple(r.overrides) for r in returns])
            return returns

        returns = self._each_job(job_overrides, initial_job_idx, _collect)
        jobs, places = [], []
        for k, ret in enumerate(returns):
            info = ret.return_value
            try:
                jobs.append(resolve(info["cfg"], info["overrides"]))
                places.append(k)
            except Exception as err:  # noqa: BLE001  (bad input of one job: recorded, the sweep goes on)
                cli._keep_failure(info["cfg"], info["out_dir"], info["overrides"], err)
                cli._sweep_failures.add(str(Path(info["out_dir"]).resolve()))
                log.error("job %s failed: %s (record kept in %s)", info["num"], err, info["out_dir"])
                ret.return_value = None
        units = [[(jobs[i], returns[places[i]].return_value["out_dir"]) for i in cohort] for cohort in group(jobs)]
        for cohort in group(jobs):
            if len(cohort) == 1 and alone_reason(jobs[cohort[0]]):
                log.info(f"job {returns[places[cohort[0]]].return_value['num']} runs alone: "
                         f"{alone_reason(jobs[cohort[0]])}")
        results = self._run(units)
        flat = [(cohort, r) for cohort, rs in zip(group(jobs), results) for r in zip(cohort, rs)]
        for _, (i, result) in flat:
            ret = returns[places[i]]
            info = ret.return_value
            if isinstance(result, str):
                cli._sweep_failures.add(str(Path(info["out_dir"]).resolve()))
                log.error("job %s failed: %s (record kept in %s)", info["num"], result, info["out_dir"])
                result = None
            ret.return_value = result
            ret.status = JobStatus.COMPLETED
        for ret in returns:
            if isinstance(ret.return_value, dict):  # a job whose config failed before it was resolved
                ret.return_value = None
        return returns

    def _run(self, units: list) -> list:
        if self.executor == "inline":
            return run_units(units)
        import submitit

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        executor = submitit.AutoExecutor(folder=str(sweep_dir / ".submitit" / "%j"), cluster=self.executor)
        params = {"timeout_min": 60 * 24, "name": "kdbench-cohort", **self.submitit_params}
        executor.update_parameters(**params)
        submitted = executor.map_array(run_units, [[unit] for unit in units])
        log.info(f"submitted {len(submitted)} submitit jobs ({self.executor}), one per cohort")
        results = []
        for job in submitted:
            try:
                results.append(job.result()[0])
            except Exception as err:  # noqa: BLE001  (the whole submitit job died: every member failed)
                results.append(None)
                log.error("submitit job %s failed: %s", job.job_id, err)
        return [r if r is not None else [f"submitit job failed"] * len(u) for r, u in zip(results, units)]


def _print_cohorts(config: DictConfig, cfgs: list, overrides: list) -> None:
    """The dry run's cohorts: members, the teacher forwards shared, and the FLOPs saved."""
    from kdbench.cohort import alone_reason, group
    from kdbench.job import resolve
    from kdbench.plan import _cost, forward_flops, planned_train_size, teacher_outputs_cached

    jobs = []
    for cfg, ov in zip(cfgs, overrides):
        try:
            jobs.append(resolve(cfg, ov))
        except Exception:  # noqa: BLE001  (its plan.json says why)
            continue
    lines, saved = [], 0.0
    for cohort in group(jobs):
        first = jobs[cohort[0]]
        if len(cohort) == 1:
            reason = alone_reason(first)
            lines.append(f"  alone: {first.labels['method']} {first.labels['student']} s{first.seed}"
                         + (f" ({reason})" if reason else ""))
            continue
        samples, epochs = planned_train_size(first.dataset), first.trainer.epochs
        forward = sum(forward_flops(t.model, first.dataset) for t in first.teachers)
        per_job = forward * samples * (1 if teacher_outputs_cached(first) else epochs)
        saved += per_job * (len(cohort) - 1)
        names = ", ".join(f"{jobs[i].labels['method']}/{jobs[i].labels['student']}" for i in cohort)
        lines.append(f"  cohort of {len(cohort)} (seed {first.seed}, teacher "
                     f"{'+'.join(t.model.label for t in first.teachers) or '-'}): {names}; teacher forward shared, "
                     f"saves {_cost(per_job * (len(cohort) - 1), config.dry_run_tflops)}")
    print("\nkdbench cohorts (hydra/launcher=cohort):\n" + "\n".join(lines)
          + f"\n  teacher forwards saved in all: {_cost(saved, config.dry_run_tflops)}", flush=True)
