"""Teachers: loaded from a checkpoint, or trained once with the vanilla recipe into a content-addressed store.

The store key is the hash of everything that determines the trained weights (architecture, dataset, recipe,
seed). The sha256 of the weights file is recorded at save time and verified at every load. A file lock makes
parallel jobs of one sweep train a shared teacher once and wait for it.

A teacher config may say how it is trained instead of vanilla CE: `distill: {from: <teacher config>, method:
<method config>}` (teaching assistants, TAKD; see conf/experiment/takd_plain_cnn_c100.yaml). Such a teacher is
trained by a distillation job (student = its model, teacher = `distill.from`, method = `distill.method`), stored
under the hash of that job's whole config, which contains the `from` teacher's config, so chains nest.
"""
from __future__ import annotations

import copy
import fcntl
import json
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from kdbench.errors import CorruptCheckpoint, KDBenchError
from kdbench.io import config_hash, ensure_writable_dir, load_torch, save_torch, sha256_file, write_json
from kdbench.models import TapModel, load_reference_checkpoint

WEIGHTS_FILE = "teacher.pt"
META_FILE = "meta.json"


def _leaves(tree: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 0.01}} and {"optim.lr": 0.01} both -> {"optim.lr": 0.01}: recipe entries override leaves."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def teacher_run_config(cfg: DictConfig) -> DictConfig:
    """The config the teacher is trained with: the run's recipe, the teacher's seed and recipe overrides, and
    vanilla CE, or, when the teacher config has `distill: {from, method}`, that method with `from` as its teacher."""
    tcfg = copy.deepcopy(cfg)
    recipe_cfg = cfg.teacher.get("recipe")
    recipe = _leaves(OmegaConf.to_container(recipe_cfg, resolve=True)) if recipe_cfg else {}
    distill = cfg.teacher.get("distill")
    with open_dict(tcfg):
        tcfg.student = {"model": cfg.teacher.model, "label": cfg.teacher.label}
        if distill:
            if not distill.get("from") or not distill.get("method"):
                raise KDBenchError(f"teacher '{cfg.teacher.label}': teacher.distill needs both 'from' (a teacher "
                                   f"config) and 'method' (a method config)")
            tcfg.teacher = copy.deepcopy(distill["from"])
            tcfg.method = copy.deepcopy(distill.method)
            # This teacher's recipe overrides must not leak into how its own teacher is trained: pin the run's
            # original values in the `from` teacher's recipe (its own recipe entries still win).
            pinned = {k: OmegaConf.select(cfg, k) for k in recipe if OmegaConf.select(cfg, k) is not None}
            tcfg.teacher.recipe = {**pinned, **(tcfg.teacher.get("recipe") or {})}
        else:
            tcfg.method = {"name": "vanilla", "weights": {"ce": 1.0}}
        tcfg.seed = cfg.teacher.seed
        tcfg.logger = {"name": "none"}
        for key, value in recipe.items():
            OmegaConf.update(tcfg, key, value, merge=False)
        if not distill:
            # Applied above; keeping it would make two recipes that produce the same job store two teachers.
            tcfg.teacher.recipe = {}
    return tcfg


@contextmanager
def _locked(directory: Path):
    ensure_writable_dir(directory)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


STUDENT_ONLY = ("method", "student", "seed", "pair")  # override keys (and their subkeys) that never shape a teacher


def store_overrides(job_overrides) -> tuple[str, ...]:
    """The overrides a stored teacher's training record keeps from the job that trained it: all but the student's
    own (method, student, seed, pair) and teacher.seed (the record's seed), so that leaderboards tell apart
    teachers trained with different recipes and average one recipe's teachers over their seeds."""
    def shapes_teacher(override: str) -> bool:
        key = override.split("=", 1)[0].lstrip("+~")
        return key.split(".")[0] not in STUDENT_ONLY and key != "teacher.seed"

    return ("(teacher for the store)", *(o for o in job_overrides if shapes_teacher(o)))


def obtain_teacher(cfg: DictConfig, data, device: torch.device, job_overrides=()) -> tuple[TapModel, dict]:
    """(frozen teacher in eval mode on `device`, provenance for the run record)."""
    from kdbench.train import build_model, run, semantic_config

    teacher = build_model(cfg.teacher.model, data)
    if cfg.teacher.checkpoint:
        path = Path(cfg.teacher.checkpoint).expanduser()
        load_reference_checkpoint(teacher, load_torch(path, "teacher checkpoint"))
        source = {"kind": "checkpoint", "path": str(path), "sha256": sha256_file(path)}
    else:
        tcfg = teacher_run_config(cfg)
        key = config_hash(semantic_config(tcfg))
        directory = Path(cfg.paths.teacher_store) / f"{cfg.teacher.label}-{key}"
        weights, meta_path = directory / WEIGHTS_FILE, directory / META_FILE
        with _locked(directory):
            if not meta_path.exists():
                run(tcfg, directory / "train", overrides=store_overrides(job_overrides))
                save_torch(weights, {"model": torch.load(directory / "train" / "checkpoint.pt", weights_only=False)["student"]})
                (directory / "train" / "checkpoint.pt").unlink()
                write_json(meta_path, {"key": key, "sha256": sha256_file(weights), "config": semantic_config(tcfg),
                                       "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        meta = json.loads(meta_path.read_text())
        if not weights.exists() or sha256_file(weights) != meta["sha256"]:
            raise CorruptCheckpoint(f"stored teacher {weights} is missing or does not match its recorded sha256; "
                                    f"delete {directory} and it will be retrained")
        load_reference_checkpoint(teacher, load_torch(weights, "stored teacher"))
        source = {"kind": "store", "path": str(weights), "sha256": meta["sha256"], "key": key}
        if cfg.teacher.get("distill"):
            source["distilled_from"] = str(tcfg.teacher.label)
            source["distill_method"] = str(tcfg.method.get("label") or tcfg.method.name)
    teacher.to(device).eval().requires_grad_(False)
    return teacher, source
