"""Plugin packages: a package that registers methods through the `kdbench.methods` entry-point group ships their
configs in `<package>/conf/method/<name>.yaml` (and may add other groups the same way, e.g. `conf/experiment/`).
kdbench puts `pkg://<package>.conf` on Hydra's search path itself (hydra_plugins/kdbench_searchpath, a Hydra
SearchPathPlugin), so `kdbench method=<name>` finds them with no `hydra.searchpath` setting.

A plugin's pyproject.toml:

    [project.entry-points."kdbench.methods"]
    l1_logits = "kdbench_example_plugin.methods"     # a module whose import registers the method(s)

and its package data must include conf/**/*.yaml (tests/plugin_example is a complete, tested example).
"""
from __future__ import annotations

from importlib.metadata import entry_points
from importlib.util import find_spec
from pathlib import Path

ENTRY_POINT_GROUP = "kdbench.methods"


def plugin_packages() -> list[str]:
    """The top-level packages of the modules registered in the `kdbench.methods` entry-point group."""
    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        package = ep.value.split(":", 1)[0].split(".", 1)[0].strip()
        if package and package != "kdbench" and package not in names:
            names.append(package)
    return names


def _package_dir(package: str) -> Path | None:
    try:
        spec = find_spec(package)  # a top-level package: found without being imported
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def plugin_conf_dirs() -> list[Path]:
    """`<package>/conf` of every plugin package that has one."""
    dirs = []
    for package in plugin_packages():
        root = _package_dir(package)
        if root is not None and (root / "conf").is_dir():
            dirs.append(root / "conf")
    return dirs


def plugin_search_paths() -> list[str]:
    """Hydra search-path entries for the plugin packages' config trees: `pkg://<package>.conf`."""
    return [f"pkg://{d.parent.name}.conf" for d in plugin_conf_dirs()]
