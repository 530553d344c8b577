"""Experiment loggers: none (default) or wandb. wandb never prompts: without an API key it logs offline."""
from __future__ import annotations

import os
from pathlib import Path


class NullLogger:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


class WandbLogger:
    def __init__(self, cfg, out_dir: Path, labels: dict, config: dict):
        import wandb

        mode = cfg.mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group, mode=mode, dir=str(out_dir), config=config,
            tags=[f"{k}:{labels[k]}" for k in ("dataset", "teacher", "student", "method") if labels.get(k)],
            name=f"{labels['method']}-{labels['student']}-s{config.get('seed')}", reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "completed" else 1)


def create_logger(cfg, out_dir: Path, labels: dict, config: dict):
    if cfg is None or cfg.name == "none":
        return NullLogger()
    if cfg.name == "wandb":
        return WandbLogger(cfg, out_dir, labels, config)
    raise ValueError(f"unknown logger '{cfg.name}'; use logger=none or logger=wandb")
