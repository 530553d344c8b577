"""Experiment loggers: csv (the default), tensorboard, wandb, or none; several at once.

The `logger` config group selects them: each option adds its own key under `logger` (conf/logger/<name>.yaml), so
`logger=csv` composes `{csv: {...}}` and `logger=[csv,tensorboard,wandb]` composes all three; `logger=none` composes
`{}`. Every logger receives the same per-epoch metrics (`lr`, `test/top1`, `test/loss`, `train/<term>`) with the
epoch as the step. The run record (metrics.json) is written whatever the loggers are.

- csv: `<job>/metrics.csv`, one row per epoch (columns `epoch` then the metrics), rewritten atomically each epoch;
  a resumed run keeps the rows of the epochs before the one it restarts from. Read it with `pandas.read_csv`.
- tensorboard: event files in `<job>/tensorboard/` (torch.utils.tensorboard, the `tensorboard` package).
- wandb: online when a key is known (`wandb login` stores it in ~/.netrc; or WANDB_API_KEY), offline otherwise,
  never prompting; WANDB_MODE wins over `mode: auto`. An offline run prints one line with its `wandb sync` command.
"""
from __future__ import annotations

import csv
import io
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from kdbench.io import atomic_write_bytes

LOGGERS = ("csv", "tensorboard", "wandb")


class NullLogger:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


class CSVLogger:
    """One row per epoch in `<out_dir>/<file>`: `epoch`, then every metric in the order first seen."""

    def __init__(self, cfg, out_dir: Path):
        self.path = Path(out_dir) / str(cfg.get("file") or "metrics.csv")
        self.rows: list[dict] = []
        if self.path.exists():  # a resumed run: keep what the earlier attempt logged
            with open(self.path, newline="", encoding="utf-8") as f:
                self.rows = list(csv.DictReader(f))

    def log(self, metrics: dict, step: int) -> None:
        self.rows = [r for r in self.rows if int(float(r["epoch"])) < step]
        self.rows.append({"epoch": step, **metrics})
        columns: dict[str, None] = {}
        for row in self.rows:
            columns.update(dict.fromkeys(row))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_bytes(self.path, text.getvalue().encode())

    def finish(self, status: str) -> None:
        pass


class TensorBoardLogger:
    """Scalars in `<out_dir>/<dir>/events.out.tfevents.*`, one point per epoch."""

    def __init__(self, cfg, out_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch.utils.tensorboard imports the tensorboard package
            from kdbench.errors import KDBenchError

            raise KDBenchError(f"logger=tensorboard needs the tensorboard package ({err}); "
                               "pip install 'kdbench[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / str(cfg.get("dir") or "tensorboard")))

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def finish(self, status: str) -> None:
        self.writer.close()


def wandb_key_stored() -> bool:
    """Whether wandb has a key without prompting: WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes for
    the API host (WANDB_BASE_URL's, default api.wandb.ai; NETRC names another netrc file)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        auth = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def wandb_mode(configured: str) -> str:
    """The mode a wandb run starts in: an explicit `mode` as given; `auto`: WANDB_MODE when set, else online when a
    key is stored, else offline."""
    if configured != "auto":
        return configured
    env = os.environ.get("WANDB_MODE")
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    return "online" if wandb_key_stored() else "offline"


class WandbLogger:
    def __init__(self, cfg, out_dir: Path, labels: dict, config: dict):
        import wandb

        self.mode = wandb_mode(str(cfg.get("mode", "auto")))
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=cfg.get("project"), entity=cfg.get("entity"), group=cfg.get("group"), mode=self.mode,
            dir=str(out_dir), config=config,
            tags=[f"{k}:{labels[k]}" for k in ("dataset", "teacher", "student", "method") if labels.get(k)],
            name=f"{labels['method']}-{labels['student']}-s{config.get('seed')}", reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, status: str) -> None:
        run_dir = Path(self.run.dir).parent  # <out>/wandb/offline-run-<time>-<id> (run.dir is its files/)
        self.run.finish(exit_code=0 if status == "completed" else 1)
        if self.mode == "offline":
            print(f"kdbench: wandb logged offline (no key: `wandb login` or WANDB_API_KEY); upload with: "
                  f"wandb sync {run_dir}", flush=True)


class MultiLogger:
    """Several loggers as one; each gets every call."""

    def __init__(self, loggers: list):
        self.loggers = loggers

    def log(self, metrics: dict, step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def finish(self, status: str) -> None:
        for logger in self.loggers:
            logger.finish(status)


def selected(cfg) -> dict:
    """{logger name: its options} of a `logger` config node. Also reads the older one-logger form `{name: ...}`."""
    if cfg is None:
        return {}
    data = dict(cfg)
    if "name" in data:  # {name: wandb, project: ...} (records and teacher jobs made before several loggers)
        name = str(data.pop("name"))
        return {} if name == "none" else {name: data}
    unknown = sorted(set(data) - set(LOGGERS))
    if unknown:
        from kdbench.errors import InvalidSetting

        raise InvalidSetting(f"unknown logger(s) {unknown}; choose from {', '.join(LOGGERS)} or none "
                             f"(several: logger=[csv,wandb])")
    return {name: (data[name] or {}) for name in LOGGERS if name in data}


def create_logger(cfg, out_dir: Path, labels: dict, config: dict):
    made = []
    for name, options in selected(cfg).items():
        if name == "csv":
            made.append(CSVLogger(options, out_dir))
        elif name == "tensorboard":
            made.append(TensorBoardLogger(options, out_dir))
        elif name == "wandb":
            made.append(WandbLogger(options, out_dir, labels, config))
        else:  # the older {name: ...} form with a name that is no logger
            raise ValueError(f"unknown logger '{name}'; use logger=csv, tensorboard, wandb or none")
    if not made:
        return NullLogger()
    return made[0] if len(made) == 1 else MultiLogger(made)
