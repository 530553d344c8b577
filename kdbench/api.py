"""kdbench from Python: compose a job's config, run it, load what it trained.

    from kdbench import api

    record = api.run(["method=kd", "seed=1", "trainer.epochs=2"], results="outputs")   # one job, its record (dict)
    student, job = api.load_student(record["run_dir"])                                  # the trained student
    cfg = api.compose(["experiment=crd_cifar100_same", "pair=resnet56-resnet20"])        # a DictConfig to inspect

`run` composes exactly what `kdbench <overrides>` composes for one job (the primary config's sweep values do not
apply: a value the sweep would vary takes its default unless given) and runs it in `<results>/runs/<time>_<id>/`
(or `out_dir`), with the same teacher store, record and checkpoints. A sweep is a loop over `run`, or the CLI.
"""
from __future__ import annotations

import os
import secrets
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import DictConfig, open_dict

from kdbench.config import PRIMARY, CONF_DIR, check_experiment_names, register_configs

__all__ = ["compose", "run", "load_student"]


def _setup() -> None:
    from omegaconf import OmegaConf

    os.environ.setdefault("KDBENCH_UID", secrets.token_hex(3))
    if not OmegaConf.has_resolver("kdbench_uid"):
        OmegaConf.register_new_resolver("kdbench_uid", lambda: os.environ["KDBENCH_UID"])
    register_configs()


def compose(overrides: Sequence[str] = (), results: Optional[str | Path] = None) -> DictConfig:
    """The config of one job for these overrides (as the CLI composes it; `results` sets paths.root)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    _setup()
    overrides = list(overrides)
    check_experiment_names(overrides)
    sweeps = [o for o in overrides if "," in o.split("=", 1)[-1] and not o.split("=", 1)[-1].startswith("[")]
    if sweeps:
        from kdbench.errors import InvalidSetting

        raise InvalidSetting(f"api.run runs one job; {sweeps} would sweep: loop over the values, or use the CLI")
    if results is not None:
        overrides.append(f"paths.root={Path(results).expanduser()}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(PRIMARY, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} interpolations (the wandb group) resolve as in the CLI
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run(overrides: Sequence[str] = (), results: Optional[str | Path] = None, out_dir: Optional[str | Path] = None) -> dict:
    """Compose and run one job; returns its record (metrics.json's content) with `run_dir` added. Raises the job's
    error after recording it, like the CLI does for a single job."""
    from kdbench.job import resolve, run as run_job

    cfg = compose(overrides, results)
    if out_dir is None:
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        out_dir = Path(str(cfg.paths.root)) / "runs" / f"{stamp}_{os.environ['KDBENCH_UID']}_{secrets.token_hex(2)}"
    record = run_job(resolve(cfg, tuple(overrides)), Path(out_dir))
    return {**record, "run_dir": str(Path(out_dir))}


def load_student(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(student, job) of a finished run: the student at its last epoch, in eval mode on `device`, and the resolved
    job (its dataset's normalisation in job.dataset.mean/std, the model in job.student)."""
    from kdbench.job import load_finished

    return load_finished(Path(run_dir), device)
