"""The shape of the core: no import cycles, configs read only at the top (cli, config, job), one rule for the
settings that change no result, and a loop that takes few parameters."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import kdbench
from kdbench.config import NON_SEMANTIC, is_semantic, override_key, semantic_overrides
from kdbench.report import _setting
from tests.conftest import resolve_job

PACKAGE = Path(kdbench.__file__).parent
# The modules that may read a composed config (DictConfig); everything else receives typed objects.
# the top layer: the CLI (and its commands: help, list, --cfg job), the Python API, the published results
CONFIG_READERS = {"kdbench.cli", "kdbench.commands", "kdbench.api", "kdbench.config", "kdbench.job", "kdbench.publish"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every kdbench module a file imports, at the top or inside functions (`from kdbench.x import y` counts as
    kdbench.x.y when that is a module, else kdbench.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kdbench")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdbench"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _exists(sub) else node.module)
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").exists() or (PACKAGE.parent / rel / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        graph[name] = {m for m in _imports(path) if m != name}
    return graph


def test_no_module_of_kdbench_imports_itself_back_through_others():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_only_the_top_layer_reads_composed_configs():
    readers = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if "omegaconf" in text or "from hydra" in text or "import hydra" in text:
            readers.add(_module_name(path))
    assert readers <= CONFIG_READERS, f"modules below kdbench.job that read configs: {sorted(readers - CONFIG_READERS)}"


def test_the_loop_takes_at_most_four_parameters():
    from kdbench.train import train_epoch

    assert len(inspect.signature(train_epoch).parameters) <= 4


# ----------------------------------------------------------------------------- the settings that change no result

# One override per non-semantic setting (hydra's own settings never reach a job's config).
NON_SEMANTIC_EXAMPLES = {
    "paths": "paths.root=/elsewhere", "logger": "+logger.tag=x", "dry_run": "dry_run=true",
    "dry_run_tflops": "dry_run_tflops=3", "dataset.root": "dataset.root=/data/elsewhere",
    "dataset.download": "dataset.download=true", "trainer.device": "trainer.device=cpu",
    "trainer.progress": "trainer.progress=false", "trainer.resume": "trainer.resume=false",
    "trainer.num_workers": "trainer.num_workers=3", "trainer.data_on_device": "trainer.data_on_device=false",
    "trainer.eval_batch_size": "trainer.eval_batch_size=7", "trainer.teacher_cache": "trainer.teacher_cache=false",
    "trainer.teacher_cache_gb": "trainer.teacher_cache_gb=1",
    "trainer.keep_every": "trainer.keep_every=10",  # a stored teacher's anchors (RCO): kept, the result unchanged
    # the view-exact logit cache equals the live teacher bit for bit on CPU (tests/test_view_cache.py)
    "trainer.teacher_view_cache": "trainer.teacher_view_cache=off",
    "trainer.teacher_view_cache_gb": "trainer.teacher_view_cache_gb=1",
}


def test_every_non_semantic_setting_has_an_example_here():
    assert set(NON_SEMANTIC_EXAMPLES) == set(NON_SEMANTIC) - {"hydra"}
    assert all(not is_semantic(override_key(o)) for o in NON_SEMANTIC_EXAMPLES.values())


@pytest.mark.parametrize("override", sorted(NON_SEMANTIC_EXAMPLES.values()))
def test_a_non_semantic_setting_changes_neither_hash_nor_store_key_nor_leaderboard_row(override):
    base, changed = resolve_job(["method=kd"]), resolve_job(["method=kd", override])
    assert changed.key == base.key  # the run's config hash
    assert changed.teacher.entry == base.teacher.entry  # the teacher-store key
    assert _setting([override]) == "" and semantic_overrides([override]) == []  # the leaderboard's setting column


@pytest.mark.parametrize("override, shapes_teacher", [("optim.lr=0.1", False), ("trainer.epochs=3", False),
                                                      ("dataset.train_size=500", True),
                                                      ("+teacher.recipe.optim.lr=0.01", True)])
def test_a_semantic_setting_changes_the_hash_and_the_row_and_the_store_key_when_it_shapes_the_teacher(
        override, shapes_teacher):
    base, changed = resolve_job(["method=kd"]), resolve_job(["method=kd", override])
    assert changed.key != base.key and _setting([override]) == override
    assert (changed.teacher.entry != base.teacher.entry) == shapes_teacher
