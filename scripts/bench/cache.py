"""KD with the view-exact teacher-logit cache against KD with the live teacher, side by side in one run.

    python scripts/bench/cache.py [--samples 128] [--epochs 4] [--repeats 2] [--device cpu] [--out FILE]

Both sides train resnet32x4 -> resnet8x4 with KD (the CIFAR-100 recipe, batch 64) on synthetic CIFAR-100-shaped data
(crop padding 4 + flip: 162 views per image), a resnet32x4 with random weights from a checkpoint as the teacher:
  live    trainer.teacher_view_cache=off: a teacher forward every step
  cached  the teacher's logits gathered from the view cache (built once, before the first cached run, by
          trainer.teacher_view_cache=build; its build time is measured and reported apart)
Reported per training image and epoch (the history's epoch seconds, which include a 16-image test pass, over
samples): live and cached seconds (mean ± std over repeats x epochs, n), their ratio; the build's seconds per image;
and what a table cell costs with the cache, build included, for 3 seeds x 240 epochs against 3 x 240 live epochs
(the cache is built once per teacher and training set and serves every seed and every logit method).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from common import job_of, random_teacher  # noqa: E402  (scripts/bench/common.py)

BATCH = 64


def job(workdir: Path, samples: int, epochs: int, device: str, ckpt: Path, mode: str, seed: int):
    return job_of(["dataset=synthetic", f"dataset.train_size={samples}", "dataset.test_size=16", "recipe=cifar100",
                   f"trainer.epochs={epochs}", f"trainer.batch_size={BATCH}", "trainer.progress=false",
                   f"trainer.device={device}", f"trainer.teacher_view_cache={mode}", "teacher=resnet32x4",
                   f"teacher.checkpoint={ckpt}", "student=resnet8x4", "method=kd", "logger=none", f"seed={seed}",
                   f"paths.root={workdir}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=128, help="training images (a multiple of 64)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    from kdbench.job import run

    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} samples={args.samples} "
          f"batch={BATCH} epochs={args.epochs} repeats={args.repeats}", flush=True)
    per_image = {"live": [], "cached": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = random_teacher(tmp)
        built = run(job(tmp, args.samples, 1, args.device, ckpt, "build", seed=100), tmp / "build")
        info = built["teacher_view_cache"]
        assert info["state"] == "built", info
        meta = json.loads(Path(info["path"]).with_suffix(".json").read_text())
        build_per_image = meta["build_seconds"] / args.samples
        print(f"build: {meta['build_seconds']:.1f} s for {args.samples} images x {info['views']} views "
              f"({build_per_image:.3f} s per image; {info['bytes'] / 2**20:.1f} MiB)", flush=True)
        for r in range(args.repeats):
            for side, mode in (("live", "off"), ("cached", "auto")):  # interleaved: load drift hits both alike
                record = run(job(tmp, args.samples, args.epochs, args.device, ckpt, mode, seed=r + 1),
                             tmp / f"{side}{r}")
                state = record["teacher_view_cache"]["state"]
                assert (state == "found") == (side == "cached"), (side, record["teacher_view_cache"])
                secs = [e["seconds"] / args.samples for e in record["history"]]
                per_image[side] += secs
                print(f"{side:<7} repeat {r + 1}: {statistics.mean(secs) * 1e3:.2f} ms per image and epoch", flush=True)
    live, cached = statistics.mean(per_image["live"]), statistics.mean(per_image["cached"])
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    for side, xs in per_image.items():
        print(f"{side:<7} {statistics.mean(xs) * 1e3:8.2f} ± {sd(xs) * 1e3:.2f} ms per image and epoch (n={len(xs)})")
    epochs = 3 * 240
    cell = (build_per_image + epochs * cached) / (epochs * live)
    print(f"cached / live per epoch = {cached / live:.3f}; build = {build_per_image / live:.0f} live epochs; "
          f"a 3-seed x 240-epoch cell with the cache, build included: {cell:.3f} of live")
    if args.out:
        args.out.write_text(json.dumps({"argv": sys.argv[1:], "device": args.device, "torch": torch.__version__,
                                        "seconds_per_image_epoch": per_image, "build_seconds_per_image":
                                        build_per_image, "views": info["views"], "cached_over_live": cached / live,
                                        "cell_3x240_over_live": cell}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("KDBENCH_RUN", "bench")
    main()
