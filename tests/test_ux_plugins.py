"""A third-party method package found through the `kdbench.methods` entry point, with its configs discovered
without any hydra.searchpath setting (tests/plugin_example, installed here as a dist-info on PYTHONPATH)."""
import json
import os
import subprocess
import sys

import numpy as np
import torch

from tests.conftest import KDBENCH, REPO

EXAMPLE = REPO / "tests" / "plugin_example"


def _installed(tmp_path):
    """The example package as pip would leave it: importable, with its entry point in a dist-info."""
    site = tmp_path / "site"
    info = site / "kdbench_example_plugin-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kdbench-example-plugin\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[kdbench.methods]\nl1_logits = kdbench_example_plugin.methods\n")
    path = os.pathsep.join([str(REPO), str(EXAMPLE), str(site), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "KDBENCH_RESULTS": str(tmp_path / "results"), "PYTHONWARNINGS": "ignore"}


def test_a_plugin_method_and_its_config_are_found_without_a_search_path_setting(tmp_path):
    env = _installed(tmp_path)
    listed = subprocess.run([*KDBENCH, "list", "methods", "l1"], capture_output=True, text=True, env=env)
    assert listed.returncode == 0 and listed.stdout.startswith("l1_logits") and "example plugin" in listed.stdout
    helped = subprocess.run([*KDBENCH, "--help"], capture_output=True, text=True, env=env)
    assert "l1_logits" in helped.stdout
    out = subprocess.run([*KDBENCH, "method=l1_logits", "teacher=mlp_32", "seed=1", "trainer.epochs=1",
                          "trainer.progress=false", "++teacher.recipe.trainer.epochs=1"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (path,) = (tmp_path / "results" / "multirun").glob("*/0/metrics.json")
    record = json.loads(path.read_text())
    assert record["method"] == "l1_logits" and record["config"]["method"]["weights"] == {"ce": 1.0, "l1": 1.0}
    assert "l1" in record["history"][0]["train"]


def test_without_the_plugin_installed_the_search_path_is_unchanged():
    from kdbench.plugins import plugin_search_paths

    assert "pkg://kdbench_example_plugin.conf" not in plugin_search_paths()


def test_the_example_plugins_loss_is_the_mean_absolute_logit_difference_and_spares_the_teacher():
    sys.path.insert(0, str(EXAMPLE))
    try:
        from kdbench_example_plugin.methods import l1_logits_loss
    finally:
        sys.path.remove(str(EXAMPLE))
    z_s = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    z_t = np.array([[0.5, -1.0, 0.5], [2.0, 1.0, 1.0]])
    expected = sum(abs(a - b) for row_s, row_t in zip(z_s, z_t) for a, b in zip(row_s, row_t)) / 6  # by hand: (0.5 + 1 + 0 + 2 + 2 + 2) / 6 = 1.25
    s = torch.tensor(z_s, requires_grad=True)
    t = torch.tensor(z_t, requires_grad=True)
    loss = l1_logits_loss(s, t)
    assert abs(loss.item() - expected) < 1e-6 and abs(expected - 1.25) < 1e-12
    loss.backward()
    assert t.grad is None and s.grad is not None
