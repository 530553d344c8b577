"""The teacher store from the command line (list, verify, prune), exporting a distilled student, the Python API,
fp16 training, and checkpoints loaded with weights_only=True."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from kdbench import api
from kdbench.errors import CorruptCheckpoint, InvalidSetting
from kdbench.io import load_torch
from tests.conftest import KDBENCH

SHORT = ["method=kd", "teacher=mlp_32", "seed=1", "trainer.epochs=2", "trainer.progress=false",
         "++teacher.recipe.trainer.epochs=2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A kd run through kdbench.api (its teacher trained into the store of the results root), and that root."""
    root = tmp_path_factory.mktemp("results")
    record = api.run(SHORT, results=root)
    return root, record


def _cli(root, *args):
    env = {**os.environ, "KDBENCH_RESULTS": str(root), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*KDBENCH, *args], capture_output=True, text=True, env=env, cwd=root, timeout=300)


def test_the_api_runs_one_job_and_loads_its_student(finished):
    root, record = finished
    assert record["status"] == "completed" and record["method"] == "kd" and record["epochs_done"] == 2
    run_dir = record["run_dir"]
    assert str(run_dir).startswith(str(root / "runs"))
    assert json.loads((root / "runs").glob("*/metrics.json").__next__().read_text())["config_hash"] == record["config_hash"]
    student, job = api.load_student(run_dir)
    assert not student.training and job.student.name == "mlp_32"
    cfg = api.compose(["method=dkd", "seed=4"], results=root)
    assert cfg.method.name == "dkd" and cfg.seed == 4 and cfg.paths.root == str(root)
    with pytest.raises(InvalidSetting, match="one job"):
        api.compose(["seed=1,2"])


def test_teachers_list_shows_what_is_stored_and_who_used_it(finished):
    root, record = finished
    out = _cli(root, "teachers", "list")
    assert out.returncode == 0, out.stderr
    (entry,) = (root / "teachers").iterdir()
    line = next(line for line in out.stdout.splitlines() if line.startswith(entry.name))
    teacher = json.loads((entry / "train" / "metrics.json").read_text())
    for text in ("mlp_32", "digits", "vanilla, 2 ep, batch 64, sgd", f"{teacher['last_top1']:.2f}", "complete",
                 "1 run(s)"):
        assert text in line, text


def test_teachers_verify_checks_every_sha_and_fails_on_a_changed_file(finished, tmp_path):
    root, _ = finished
    out = _cli(root, "teachers", "verify")
    assert out.returncode == 0 and "sha256 ok" in out.stdout
    store = tmp_path / "store"
    shutil.copytree(root / "teachers", store)
    (entry,) = store.iterdir()
    with open(entry / "teacher.pt", "ab") as f:
        f.write(b"x")
    out = _cli(root, "teachers", "verify", "--store", str(store))
    assert out.returncode == 1 and "sha256 mismatch" in out.stdout


def test_teachers_prune_removes_half_written_and_unused_entries_only_when_confirmed(finished, tmp_path):
    root, _ = finished
    store = tmp_path / "store"
    shutil.copytree(root / "teachers", store)
    (used,) = store.iterdir()
    half = store / "resnet8-0123456789abcdef"
    (half / "train").mkdir(parents=True)
    (half / "train" / "metrics.json").write_text(json.dumps({"status": "interrupted"}))
    unused = store / "mlp_800x2-fedcba9876543210"
    shutil.copytree(used, unused)
    out = _cli(root, "teachers", "prune", "--store", str(store), "--unused")
    assert out.returncode == 0 and "would remove  resnet8-0123456789abcdef  (half-written" in out.stdout
    assert "mlp_800x2-fedcba9876543210  (used by no run" in out.stdout and "--yes" in out.stdout
    assert half.exists() and unused.exists()
    out = _cli(root, "teachers", "prune", "--store", str(store), "--yes")  # without --unused: half-written only
    assert not half.exists() and unused.exists() and used.exists()
    _cli(root, "teachers", "prune", "--store", str(store), "--unused", "--yes", "--runs", str(root / "runs"))
    assert not unused.exists() and used.exists()  # the run below runs/ learned from `used`


def test_export_writes_safetensors_torchscript_onnx_and_what_rebuilds_the_model(finished, tmp_path):
    from safetensors.torch import load_file

    from kdbench.export import load_exported

    _, record = finished
    out = _cli(tmp_path, "export", record["run_dir"], "--out", str(tmp_path / "exp"))
    assert out.returncode == 0, out.stderr
    exp = tmp_path / "exp"
    meta = json.loads((exp / "model.json").read_text())
    assert (meta["model"]["name"], meta["model"]["num_classes"], meta["model"]["input_shape"]) == ("mlp_32", 10, [1, 8, 8])
    assert meta["versions"]["kdbench"] and meta["files"] == {"safetensors": "model.safetensors",
                                                            "torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
    student, _ = api.load_student(record["run_dir"])
    weights = load_file(str(exp / "model.safetensors"))
    assert set(weights) == set(student.state_dict())
    assert all(torch.equal(weights[k], v) for k, v in student.state_dict().items())
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        expected = student(x)
        assert torch.allclose(load_exported(exp)(x), expected)
        assert torch.allclose(torch.jit.load(str(exp / "model.torchscript.pt"))(x), expected, atol=1e-5)
    from onnx.reference import ReferenceEvaluator

    (onnx_logits,) = ReferenceEvaluator(str(exp / "model.onnx")).run(None, {"input": x.numpy()})
    assert np.allclose(onnx_logits, expected.numpy(), atol=1e-4)


def test_export_refuses_a_run_that_did_not_finish(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"status": "failed"}))
    out = _cli(tmp_path, "export", str(tmp_path / "run"), "--out", str(tmp_path / "exp"))
    assert out.returncode == 2 and "not completed" in out.stderr


def test_kdbench_checkpoints_load_with_weights_only(finished):
    root, record = finished
    state = torch.load(os.path.join(record["run_dir"], "checkpoint.pt"), weights_only=True)
    assert state["epoch"] == 2 and "student" in state and "optimizer" in state
    (entry,) = (root / "teachers").iterdir()
    assert "model" in torch.load(entry / "teacher.pt", weights_only=True)


def test_a_checkpoint_with_pickled_objects_is_refused_unless_the_user_named_it(tmp_path, capsys):
    path = tmp_path / "ref.pth"
    torch.save({"model": {"w": torch.ones(2)}, "best_acc": np.float64(71.2)}, path)
    with pytest.raises(CorruptCheckpoint, match="weights_only=True"):
        load_torch(path, "run checkpoint")
    assert load_torch(path, "teacher checkpoint", allow_pickle=True)["best_acc"] == 71.2
    assert "needs full unpickling" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptCheckpoint, match="unreadable"):
        load_torch(tmp_path / "bad.pt", "teacher checkpoint", allow_pickle=True)


def test_fp16_steps_through_a_gradient_scaler_that_cancels_out():
    from kdbench.config import OptimConfig
    from kdbench.optim import build_step

    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    optim = OptimConfig(lr=0.1, momentum=0.0, weight_decay=0.0)
    plain, scaled = build_step(a.parameters(), optim, "fp32"), build_step(b.parameters(), optim, "fp16")
    assert plain.scaler is None and scaled.scaler is not None and scaled.scaler.get_scale() == 65536.0
    for model, policy in ((a, plain), (b, scaled)):
        policy.step(torch.nn.functional.cross_entropy(model(x), y))
    for p, q in zip(a.parameters(), b.parameters()):  # the same update: scale, then unscale
        assert torch.allclose(p, q, atol=1e-6)
    before = [p.detach().clone() for p in b.parameters()]
    scaled.step(b(x).sum() * float("inf"))  # an inf gradient: the step is skipped and the scale halved
    assert all(torch.equal(p, q) for p, q in zip(before, b.parameters())) and scaled.scaler.get_scale() == 32768.0
    with pytest.raises(Exception, match="fp16"):
        build_step(a.parameters(), OptimConfig(name="dot"), "fp16")


def test_an_fp16_job_trains_and_records_its_precision(run_job):
    record = run_job("method=vanilla", "seed=1", "trainer.epochs=2", "trainer.progress=false", "trainer.precision=fp16")
    assert record["status"] == "completed" and record["config"]["trainer"]["precision"] == "fp16"
    assert record["last_top1"] > 50
