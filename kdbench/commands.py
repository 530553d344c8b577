"""kdbench's own command-line help and listings, and the note `kdbench --cfg job` prints about the sweep.

    kdbench --help                                         subcommands, config groups and their choices
    kdbench list methods|models|datasets|experiments [F]   one line per choice; F filters names ('resnet*', 'kd')
"""
from __future__ import annotations

import fnmatch
import inspect
import re
import sys
import textwrap
from pathlib import Path

from kdbench.config import CONF_DIR

README_URL = "README.md (in the kdbench repository; `python -m pydoc kdbench.api` for the Python API)"
# The groups a user picks from, in the order the help lists them, with what each selects.
GROUPS = {
    "experiment": "a published table with its recipe (kdbench list experiments)",
    "dataset": "the data (kdbench list datasets)",
    "teacher": "the teacher's model: any registered model (kdbench list models)",
    "student": "the student's model: any registered model",
    "method": "the distillation method (kdbench list methods)",
    "pair": "a teacher/student pair with its own settings (mobile lr, TA chains)",
    "recipe": "epochs, batch size, optimizer and schedule (each dataset selects its own)",
    "optim": "the optimizer",
    "schedule": "the LR schedule",
    "trainer": "how a job runs (trainer.device, trainer.precision, trainer.epochs, ...)",
    "logger": "where per-epoch metrics go; several at once: logger=[csv,tensorboard]",
    "debug": "presets for trying a method quickly (few batches, one epoch, a separate teacher store)",
    "paths": "where data is read and results are written",
}
SUBCOMMANDS = ("report", "list", "teachers", "export")


def conf_dirs() -> list[Path]:
    """kdbench's config tree, then those plugin packages ship (kdbench.plugins)."""
    from kdbench.plugins import plugin_conf_dirs

    return [CONF_DIR, *plugin_conf_dirs()]


def group_options(group: str) -> list[str]:
    """The options of a config group, from every config directory (internal `_schema` nodes left out)."""
    names = {p.stem for d in conf_dirs() for p in (d / group).glob("*.yaml") if not p.stem.startswith("_")}
    return sorted(names, key=str.lower)


def header_sentence(path: Path) -> str:
    """The first sentence of a YAML file's header comment ('# @package' lines skipped)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        if "@package" not in line:
            lines.append(line.lstrip("# ").strip())
    text = " ".join(lines)
    return re.split(r"(?<!al\.)(?<!e\.g\.)(?<!i\.e\.)(?<=\.)\s", text, maxsplit=1)[0] if text else ""


def _wrapped(label: str, values: list[str], width: int = 100) -> list[str]:
    return textwrap.wrap(", ".join(values), width, initial_indent=f"  {label:<11}", subsequent_indent=" " * 13)


def help_text() -> str:
    lines = [
        "kdbench: knowledge-distillation benchmark harness. Hydra composes dataset x teacher x student x method;",
        "every job writes a record (metrics.json) and every sweep ends with its leaderboard beside the papers' numbers.",
        "",
        "Usage:",
        "  kdbench [GROUP=OPTION | KEY=VALUE ...]     run the jobs these overrides compose (no overrides: the",
        "                                             digits demo sweep, vanilla and kd x 3 seeds); A,B sweeps",
        "  kdbench report DIR... [--out DIR]          leaderboard of finished runs (Markdown; --out writes .md .csv",
        "                                             .html .tex)",
        "  kdbench list methods|models|datasets|experiments [FILTER]",
        "                                             what can be chosen, one line each ('resnet*', 'kd')",
        "  kdbench teachers list|verify|prune         the teacher store: what is in it, sha256 checks, clean-up",
        "  kdbench export RUN_DIR --out DIR           a finished run's student: safetensors, TorchScript, ONNX, JSON",
        "  kdbench --cfg job [OVERRIDES]              the composed config, and the sweep the command would run",
        "  kdbench ... dry_run=true                   every job of the sweep and its cost, nothing trained",
        "  kdbench --hydra-help                       Hydra's own flags (--multirun, --cfg, --shell-completion, ...)",
        "",
        "Config groups (GROUP=OPTION; a '+' adds a key a config lacks, e.g. +method.temperature=2):",
    ]
    for group, what in GROUPS.items():
        lines.append(f"  {group}: {what}")
        if group in ("teacher", "student"):
            continue
        options = group_options(group)
        if options:
            lines += _wrapped("", options)
    lines += [
        "",
        "Common settings: seed=N  trainer.epochs=N  trainer.device=auto|cpu|cuda|cuda:N|mps",
        "  trainer.precision=fp32|bf16|fp16  optim.lr=X  paths.root=DIR (or KDBENCH_RESULTS)  KDBENCH_DATA=DIR",
        "",
        "Examples:",
        "  kdbench method=kd seed=1                                   one job on digits",
        "  kdbench debug=fast method=dkd                              try a method in a minute",
        "  kdbench -m experiment=crd_cifar100_same dry_run=true       a published table's jobs and their cost",
        "  kdbench report outputs/multirun/<sweep> --out paper/       tables for a paper (.tex with booktabs)",
        "",
        "Shell completion (Hydra's): eval \"$(kdbench -sc install=bash)\"  (zsh: the same line; fish:",
        "  kdbench -sc install=fish | source)",
        f"More: {README_URL}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- kdbench list


def _matches(name: str, pattern: str | None) -> bool:
    if not pattern:
        return True
    pattern = pattern.lower()
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name.lower(), pattern)
    return pattern in name.lower()


def list_methods() -> list[tuple[str, str]]:
    """(option, 'paper; code: reference code') for every `method=` option: each YAML of the method group (several
    may configure one registered method: crd_kd is crd plus KD) and every registered method without one."""
    from omegaconf import OmegaConf

    from kdbench.distill import METHODS, list_methods as registered

    names = registered()
    rows = {}
    for d in conf_dirs():
        for path in sorted((d / "method").glob("*.yaml")):
            name = str(OmegaConf.load(path).get("name") or path.stem)
            cls = METHODS.get(name) if name in names else None
            text = _describe_method(cls) if cls is not None else header_sentence(path)
            if name != path.stem:
                text = f"[{name}] {header_sentence(path) or text}"
            rows[path.stem] = text
    for name in names:
        rows.setdefault(name, _describe_method(METHODS.get(name)) + " (no config: method=" + name + " needs one)")
    return sorted(rows.items(), key=lambda kv: kv[0].lower())


def _describe_method(cls) -> str:
    paper, code = getattr(cls, "paper", ""), getattr(cls, "code", "")
    if not paper:
        doc = inspect.getdoc(cls) or ""
        paper = doc.splitlines()[0] if doc else cls.__name__
    return paper + (f"; code: {code}" if code else "")


def list_models_described() -> list[tuple[str, str]]:
    from kdbench.models import MODELS, list_models

    out = []
    for name in list_models():
        doc = inspect.getdoc(MODELS.get(name)) or ""
        out.append((name, doc.splitlines()[0] if doc else ""))
    return sorted(out, key=lambda kv: kv[0].lower())


def _yaml_group(group: str) -> list[tuple[str, str]]:
    rows = {}
    for d in conf_dirs():
        for path in sorted((d / group).glob("*.yaml")):
            if not path.stem.startswith("_"):
                rows.setdefault(path.stem, header_sentence(path))
    return sorted(rows.items(), key=lambda kv: kv[0].lower())


LISTS = {
    "methods": list_methods,
    "models": list_models_described,
    "datasets": lambda: _yaml_group("dataset"),
    "experiments": lambda: _yaml_group("experiment"),
}


def list_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="kdbench list", description="What can be chosen, one line each.")
    parser.add_argument("kind", choices=sorted(LISTS), help="what to list")
    parser.add_argument("filter", nargs="?", help="a name pattern ('resnet*') or a part of the name ('kd')")
    args = parser.parse_args(argv)
    rows = [(n, d) for n, d in LISTS[args.kind]() if _matches(n, args.filter)]
    if not rows:
        print(f"kdbench list: no {args.kind} match '{args.filter}'", file=sys.stderr)
        return 1
    width = max(len(n) for n, _ in rows)
    for name, text in rows:
        text = text if len(text) <= 200 else text[:199].rstrip() + "…"
        print(f"{name:<{width}}  {text}".rstrip())
    return 0


# ----------------------------------------------------------------------------- kdbench --cfg job


def _overrides(argv: list[str]) -> list[str]:
    """The overrides of a command line (Hydra's flags and their values left out)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp",
                   "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"):
            skip = arg not in ("--info", "-i")
            continue
        if arg.startswith("-"):
            continue
        out.append(arg)
    return out


def _is_sweep_value(value: str) -> bool:
    depth = 0
    for ch in value:
        depth += ch in "[{(" and 1 or 0
        depth -= ch in "]})" and 1 or 0
        if ch == "," and depth == 0:
            return True
    return False


def sweep_of(argv: list[str]) -> dict[str, list[str]]:
    """{key: values} the command sweeps: the config's hydra.sweeper.params (the primary config's, an experiment's,
    a debug preset's), each replaced by the command line's value for that key, plus the command line's own A,B
    values. Empty for a single job."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = _overrides(argv)
    given = {}
    single = []
    for o in overrides:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if not key.startswith("hydra.") and _is_sweep_value(value):
            given[key] = value
            single.append(f"{o.split('=', 1)[0]}={value.split(',')[0]}")
        else:
            given.setdefault(key, value)
            single.append(o)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=single, return_hydra_config=True)
    except Exception:  # noqa: BLE001  (Hydra reports the bad override itself)
        return {}
    finally:
        GlobalHydra.instance().clear()
    if str(cfg.hydra.mode) != "RunMode.MULTIRUN" and "-m" not in argv and "--multirun" not in argv:
        return {}
    params = {str(k): str(v) for k, v in (cfg.hydra.sweeper.params or {}).items()}
    for key, value in given.items():
        if key in params or _is_sweep_value(value):
            params[key] = value
    return {k: v.split(",") for k, v in params.items() if _is_sweep_value(v)}


def sweep_note(argv: list[str]) -> str:
    """The lines `kdbench --cfg job` prints above Hydra's config: the sweep the command runs (YAML comments)."""
    sweep = sweep_of(argv)
    if not sweep:
        return "# kdbench: this command runs one job; the config below is that job's."
    jobs = 1
    for values in sweep.values():
        jobs *= len(values)
    axes = " x ".join(f"{k}={','.join(v)}" for k, v in sweep.items())
    first = " ".join(f"{k}={v[0]}" for k, v in sweep.items())
    return "\n".join([
        f"# kdbench: this command is a sweep of {jobs} jobs: {axes}.",
        "# The config below is composed before the sweep values are applied (its values for those keys are the",
        f"# defaults, not what every job runs). One job's config: kdbench --cfg job ... {first}",
    ])

