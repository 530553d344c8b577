"""One job on several processes (torch.distributed with the gloo backend on CPUs): a torchrun job trains what one
process trains with the same global batch, only rank 0 writes, CRD's memory banks stay the same on every rank, and
the per-rank helpers (gradient averaging by batch share, gathers) do what one process over the whole batch does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdbench.distributed import SINGLE, World, all_gather_cat, average_gradients

DIGITS_KD = ["method=kd", "seed=1", "trainer.epochs=3", "trainer.progress=false", "++teacher.recipe.trainer.epochs=3"]


def _env(root: Path) -> dict:
    return {**os.environ, "KDBENCH_RESULTS": str(root), "OMP_NUM_THREADS": "1"}


def _records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("metrics.json"))]


@pytest.mark.slow  # ~30 s: two torchrun processes plus the one-process reference and its teacher
def test_a_two_process_torchrun_job_writes_one_record_matching_one_process_with_the_same_global_batch(tmp_path):
    store = f"paths.teacher_store={tmp_path / 'teachers'}"
    single = subprocess.run([sys.executable, "-m", "kdbench.cli", *DIGITS_KD, store], capture_output=True, text=True,
                            env=_env(tmp_path / "single"), cwd=tmp_path, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "kdbench.cli", *DIGITS_KD, store], capture_output=True, text=True,
                         env=_env(tmp_path / "ddp"), cwd=tmp_path, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    (one,), (two,) = _records(tmp_path / "single"), _records(tmp_path / "ddp")  # exactly one record each
    assert two["status"] == "completed" and two["teacher_source"]["kind"] == one["teacher_source"]["kind"] == "store"
    (run_dir,) = (tmp_path / "ddp" / "multirun").iterdir()
    assert run_dir.name.startswith("torchrun_")  # both ranks agreed on one run directory
    assert len(list(run_dir.rglob("leaderboard.md"))) == 1 and len(list(run_dir.rglob("checkpoint*.pt"))) <= 1
    assert ddp.stdout.count("## kdbench leaderboard") == 1  # rank 0 alone prints it
    assert one["n_test"] == two["n_test"]
    for a, b in zip(one["history"], two["history"], strict=True):  # float rounding may move a sample, no more
        assert abs(a["test_top1"] - b["test_top1"]) <= 100.0 / one["n_test"] + 1e-9
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-3)


# ----------------------------------------------------------------------------- in-process groups (torch.multiprocessing)


def _spawn(fn, tmp_path: Path, *args, world_size: int = 2):
    mp.spawn(_entry, args=(fn, str(tmp_path / "rendezvous"), world_size, str(tmp_path), *args), nprocs=world_size)


def _entry(rank, fn, init_file, world_size, out, *args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(World(rank, world_size), Path(out), *args)
    finally:
        dist.destroy_process_group()


def _crd_steps(w: World, out: Path, steps: int, batch: int) -> None:
    """CRD over `steps` global batches of random embeddings; this rank takes its share; banks saved per rank."""
    from kdbench.distill import create_method
    from tests.conftest import make_pair
    from tests.helpers import method_options

    pair = make_pair("resnet14", "resnet8", n_train=40)
    pair.world = w
    torch.manual_seed(0)  # every rank (and the one-process reference) builds the same heads and banks
    crd = create_method(method_options("crd", nce_k=8), pair).double()
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randperm(40, generator=data)[:batch]
        f_s, f_t = torch.randn(batch, 64, generator=data), torch.randn(batch, 64, generator=data)
        contrast = torch.randint(0, 40, (batch, 9), generator=data)
        contrast[:, 0] = idx
        mine = slice(w.rank, None, w.size)  # the loaders' shard: every world-th sample of the global batch
        crd.crd_loss(f_s[mine].double(), f_t[mine].double(), idx[mine], contrast[mine])
    torch.save({"bank_s": crd.bank_s, "bank_t": crd.bank_t, "z": crd.z}, out / f"crd_rank{w.rank}.pt")


def test_crd_memory_banks_stay_identical_on_every_rank_and_equal_one_process_over_the_global_batch(tmp_path):
    _spawn(_crd_steps, tmp_path, 4, 8)
    (tmp_path / "single").mkdir()
    _crd_steps(SINGLE, tmp_path / "single", 4, 8)
    r0, r1 = (torch.load(tmp_path / f"crd_rank{r}.pt") for r in range(2))
    one = torch.load(tmp_path / "single" / "crd_rank0.pt")
    for key in ("bank_s", "bank_t"):
        assert torch.equal(r0[key], r1[key]), key  # every rank wrote the whole global batch into its banks
        torch.testing.assert_close(r0[key], one[key], rtol=0, atol=1e-12)
        assert not torch.equal(one[key], _fresh_banks()[key])  # the steps did move the banks
    # Z: fixed from the first batch, the mean over ranks of each rank's mean = one process's mean (equal shares)
    torch.testing.assert_close(r0["z"], r1["z"], rtol=0, atol=0)
    torch.testing.assert_close(r0["z"], one["z"], rtol=1e-12, atol=0)


def _fresh_banks():
    from kdbench.distill import create_method
    from tests.conftest import make_pair
    from tests.helpers import method_options

    pair = make_pair("resnet14", "resnet8", n_train=40)
    torch.manual_seed(0)
    crd = create_method(method_options("crd", nce_k=8), pair).double()
    return {"bank_s": crd.bank_s, "bank_t": crd.bank_t}


def _average(w: World, out: Path) -> None:
    grads = [torch.full((2, 3), float(w.rank + 1)), torch.full((4,), 10.0 * (w.rank + 1))]
    share = [0.75, 0.25][w.rank]  # e.g. a last batch of 3 + 1 samples
    average_gradients(grads, share, w)
    gathered = all_gather_cat(torch.arange(3 - 2 * w.rank, dtype=torch.float64) + 10 * w.rank, w)
    torch.save({"grads": grads, "gathered": gathered}, out / f"avg_rank{w.rank}.pt")


def test_gradients_are_averaged_by_each_ranks_share_of_the_batch_and_gathers_keep_rank_order(tmp_path):
    _spawn(_average, tmp_path)
    for r in range(2):
        got = torch.load(tmp_path / f"avg_rank{r}.pt")
        assert torch.equal(got["grads"][0], torch.full((2, 3), 0.75 * 1 + 0.25 * 2))
        assert torch.equal(got["grads"][1], torch.full((4,), 0.75 * 10 + 0.25 * 20))
        assert got["gathered"].tolist() == [0.0, 1.0, 2.0, 10.0]  # unequal sizes: 3 from rank 0, 1 from rank 1


def test_sync_batchnorm_is_refused_on_cpus_in_one_line_and_is_a_no_op_for_one_process():
    from kdbench.errors import InvalidSetting
    from kdbench.job import sync_batchnorm
    from tests.conftest import build_model

    model = build_model("resnet8", 10, (3, 32, 32))
    assert sync_batchnorm(model, True, SINGLE, torch.device("cpu")) is model
    with pytest.raises(InvalidSetting, match="trainer.sync_bn=true needs GPUs .* set trainer.sync_bn=false"):
        sync_batchnorm(model, True, World(0, 2), torch.device("cpu"))
    converted = sync_batchnorm(model, True, World(0, 2), torch.device("cuda"))  # conversion itself needs no GPU
    kinds = {type(m).__name__ for m in converted.modules()}
    assert "SyncBatchNorm" in kinds and "BatchNorm2d" not in kinds


# ----------------------------------------------------------------------------- Slurm through Hydra's submitit launcher


@pytest.mark.slow  # ~60 s: submitit starts each job in its own process
def test_a_two_job_sweep_through_the_submitit_launcher_writes_both_records_and_one_leaderboard(tmp_path):
    from tests.conftest import kdbench_cli

    out = kdbench_cli(tmp_path, "hydra/launcher=slurm_local", "method=vanilla,kd", "seed=1", "trainer.epochs=2",
                      "trainer.progress=false", "++teacher.recipe.trainer.epochs=2", env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").iterdir()
    records = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert set(records) == {"vanilla", "kd"} and all(r["status"] == "completed" for r in records.values())
    assert (sweep / ".submitit").is_dir()  # each job ran through submitit, not in this process
    assert (sweep / "leaderboard.md").exists() and out.stdout.count("## kdbench leaderboard") == 1


def test_a_launcher_whose_plugin_is_missing_is_named_with_the_extra_that_installs_it(monkeypatch):
    import importlib.util

    from kdbench.config import check_launcher
    from kdbench.errors import KDBenchError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.hydra_submitit") else real(name, *a))
    with pytest.raises(KDBenchError, match=r"hydra/launcher=slurm_gpu needs .* pip install 'kdbench\[slurm\]'"):
        check_launcher(["method=kd", "hydra/launcher=slurm_gpu"])
    check_launcher(["hydra/launcher=basic", "method=kd"])  # Hydra's own launcher needs nothing


def test_the_shipped_slurm_config_runs_one_process_per_gpu_and_requeues_on_timeout():
    from tests.conftest import compose_config

    launcher = compose_config(["hydra/launcher=slurm_gpu", "hydra.launcher.gpus_per_node=4"],
                              return_hydra_config=True).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.tasks_per_node == 4
    assert launcher.max_num_timeout > 0  # a requeued job resumes from its epoch checkpoint (trainer.resume)


FAILS_ON_RANK1 = '''
import os
from kdbench.distill import register_method
from kdbench.methods.vanilla import Vanilla


@register_method("fails_on_rank1")
class FailsOnRank1(Vanilla):
    def terms(self, batch, student, teacher):
        if os.environ["RANK"] == "1":
            raise RuntimeError("rank 1 broke in its first step")
        return super().terms(batch, student, teacher)


from kdbench.cli import main
main()
'''


@pytest.mark.slow  # ~20 s: two torchrun processes
def test_a_rank_that_fails_fails_the_job_and_rank_0_records_that_ranks_error(tmp_path):
    script = tmp_path / "fails_on_rank1.py"
    script.write_text(FAILS_ON_RANK1)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), "method=vanilla", "method.name=fails_on_rank1", "seed=1", "trainer.epochs=2",
                          "trainer.progress=false"], capture_output=True, text=True, env=_env(tmp_path / "ddp"),
                         cwd=tmp_path, timeout=600)
    assert ddp.returncode != 0
    (record,) = _records(tmp_path / "ddp")  # one record, rank 0's
    assert record["status"] == "failed"
    assert record["error"].startswith("rank 1: RuntimeError: rank 1 broke in its first step"), record["error"]
    assert list((tmp_path / "ddp").rglob("failed_rank1.json"))
