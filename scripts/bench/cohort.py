"""A table row as a cohort against the same jobs one after another, side by side in one run.

    python scripts/bench/cohort.py [--batches 4] [--epochs 1] [--repeats 1] [--device cpu] [--out FILE]

The jobs: the 13 methods of the CRD CIFAR-100 table (kd, fitnet, at, sp, cc, vid, rkd, pkt, ab, ft, fsp, nst, crd)
on resnet32x4 -> resnet8x4, plus KD on the cross-architecture student ShuffleV2 (one cohort may mix students), on
synthetic CIFAR-100-shaped data (dataset=synthetic: 100 classes, 32x32, crop + flip), batch 64, the CIFAR-100 recipe,
one seed, lr 0.01 (a random teacher on random images makes CC diverge at 0.05; the lr changes no cost). The
teacher is a resnet32x4 with random weights from a checkpoint (throughput does not depend on what the weights are).
The pre-training stages of ab, ft and fsp are set to 0 epochs on both sides (a stage trains one member alone in
either case; the comparison is the main loop), and the view cache is off on both sides.
  sequential  kdbench.job.run of each job in turn (each draws its batches and runs its teacher forward)
  cohort      kdbench.cohort.run_cohort of all the jobs (batches drawn once, one teacher forward per batch)
Reported: seconds per side (mean ± std, n), the ratio cohort / sequential, and the FLOP model's expected ratio
(teacher forward once instead of once per job: kdbench.plan's counts).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from common import job_of, random_teacher  # noqa: E402  (scripts/bench/common.py)

CRD_TABLE = ["kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd"]
BATCH = 64


def jobs(workdir: Path, batches: int, epochs: int, device: str, teacher_ckpt: Path):
    base = ["dataset=synthetic", f"dataset.train_size={BATCH * batches}", "dataset.test_size=128",
            "recipe=cifar100", f"trainer.epochs={epochs}", f"trainer.batch_size={BATCH}", "trainer.progress=false",
            f"trainer.device={device}", "trainer.teacher_view_cache=off", "optim.lr=0.01", "teacher=resnet32x4",
            f"teacher.checkpoint={teacher_ckpt}", "logger=none", "seed=1", f"paths.root={workdir}"]
    members = [(m, ["student=resnet8x4", f"method={m}"] + (["method.stage_epochs=0"] if m in ("ab", "ft", "fsp")
                                                            else [])) for m in CRD_TABLE]
    members.append(("kd ShuffleV2", ["student=ShuffleV2", "method=kd"]))
    return [(name, job_of(base + extra)) for name, extra in members]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, default=4, help="training batches of 64 per epoch")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    from kdbench.cohort import group, run_cohort
    from kdbench.job import run
    from kdbench.plan import _forward_flops

    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} batches={args.batches} "
          f"batch={BATCH} epochs={args.epochs} repeats={args.repeats}", flush=True)
    times = {"sequential": [], "cohort": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = random_teacher(tmp)
        for r in range(args.repeats):
            for side in ("sequential", "cohort"):  # interleaved: drift in the machine's load hits both alike
                work = tmp / f"{side}{r}"
                listed = jobs(work, args.batches, args.epochs, args.device, ckpt)
                assert group([j for _, j in listed]) == [list(range(len(listed)))], "the jobs must form one cohort"
                t0 = time.perf_counter()
                if side == "sequential":
                    records = [run(job, work / "runs" / str(i)) for i, (_, job) in enumerate(listed)]
                else:
                    records = run_cohort([(job, work / "runs" / str(i)) for i, (_, job) in enumerate(listed)])
                times[side].append(time.perf_counter() - t0)
                bad = [name for (name, _), rec in zip(listed, records)
                       if not isinstance(rec, dict) or rec["status"] != "completed"]
                assert not bad, f"{side}: jobs did not complete: {bad}"
                print(f"{side:<10} repeat {r + 1}: {times[side][-1]:8.1f} s for {len(listed)} jobs", flush=True)
        flops = lambda name: _forward_flops(json.dumps({"name": name}), 100, (3, 32, 32))  # noqa: E731
        teacher = flops("resnet32x4")
        students = [flops(s) for s in ["resnet8x4"] * len(CRD_TABLE) + ["ShuffleV2"]]
    seq, coh = statistics.mean(times["sequential"]), statistics.mean(times["cohort"])
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    expected = (teacher + 3 * sum(students)) / (len(students) * teacher + 3 * sum(students))
    print(f"sequential {seq:8.1f} ± {sd(times['sequential']):.1f} s (n={len(times['sequential'])})")
    print(f"cohort     {coh:8.1f} ± {sd(times['cohort']):.1f} s (n={len(times['cohort'])})")
    print(f"cohort / sequential = {coh / seq:.3f} (FLOP model, training = teacher forward + 3x student forward: "
          f"{expected:.3f}; the goal: <= 0.45)")
    if args.out:
        args.out.write_text(json.dumps({"argv": sys.argv[1:], "device": args.device, "torch": torch.__version__,
                                        "seconds": times, "ratio": coh / seq, "flop_model_ratio": expected},
                                       indent=1))


if __name__ == "__main__":
    os.environ.setdefault("KDBENCH_RUN", "bench")
    main()
