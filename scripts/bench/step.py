"""kdbench's KD training step against a plain PyTorch loop written the way the reference code trains, side by side.

    python scripts/bench/step.py [--steps 40] [--repeats 3] [--precision fp32 bf16] [--out FILE]

Both sides train resnet32x4 -> resnet8x4 with KD (T 4, CE 0.1 + KD 0.9), batch 64, SGD momentum 0.9, on random
CIFAR-100-shaped images:
  reference  RepDistiller's train_distill loop: a DataLoader over PIL images with torchvision's RandomCrop(32, 4),
             RandomHorizontalFlip, ToTensor, Normalize (2 workers), the teacher's forward every step under no_grad,
             DistillKL, the per-step loss.item() and top-1/top-5 meters
  kdbench    kdbench's own step: a job resolved from the config tree (dataset=synthetic), trained by
             kdbench.train.train_epoch with the DeviceLoader (crop and flip on the device), kdbench's KD method
             and step policy, with trainer.compile / channels_last as given
Each side runs `--steps` steps after 5 warm-up steps, `--repeats` times; reported: images/s (mean ± std, n), the
ratio kdbench / reference, and peak memory (RSS on CPU, max allocated on CUDA).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from common import job_of, random_teacher  # noqa: E402  (scripts/bench/common.py)

BATCH, CLASSES, T = 64, 100, 4.0
MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the reference-style loop


class _PILSet(torch.utils.data.Dataset):
    def __init__(self, n: int, transform):
        from PIL import Image

        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g).numpy()
        self.images = [Image.fromarray(a) for a in data]
        self.labels = (torch.arange(n) % CLASSES).tolist()
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def reference_loop(steps: int, device: torch.device, precision: str, workers: int) -> float:
    """images/s of RepDistiller's train_distill loop (KD), timed over `steps` steps after 5 warm-up steps."""
    from torchvision import transforms

    from kdbench.models import create_model

    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    loader = torch.utils.data.DataLoader(_PILSet(BATCH * (steps + 5), transform), batch_size=BATCH, shuffle=True,
                                         num_workers=workers, pin_memory=device.type == "cuda", drop_last=True)
    torch.manual_seed(0)
    student = create_model("resnet8x4", num_classes=CLASSES, input_shape=(3, 32, 32)).to(device)
    teacher = create_model("resnet32x4", num_classes=CLASSES, input_shape=(3, 32, 32)).to(device).eval()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    student.train()
    losses, top1 = [], []
    t0 = None
    for i, (x, y) in enumerate(loader):
        if i == 5:
            _sync(device)
            t0 = time.perf_counter()
        x, y = x.to(device).float(), y.to(device)
        with amp:
            logit_s = student(x)
            with torch.no_grad():
                logit_t = teacher(x)
            kl = F.kl_div(F.log_softmax(logit_s / T, 1), F.softmax(logit_t / T, 1), reduction="sum") * T * T / len(y)
            loss = 0.1 * F.cross_entropy(logit_s, y) + 0.9 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())  # AverageMeter.update(loss.item()), accuracy(output, target, topk=(1, 5))
        top1.append((logit_s.argmax(1) == y).float().mean().item())
        (logit_s.topk(5, 1).indices == y[:, None]).any(1).float().mean().item()
    _sync(device)
    return steps * BATCH / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- kdbench's step


def kdbench_loop(steps: int, device: torch.device, precision: str, compile_: bool, channels_last: bool,
                 workdir: Path) -> float:
    """images/s of kdbench's KD epoch over (steps + 5) batches, the first 5 untimed."""
    from kdbench.data import prepare_data  # noqa: F401  (registers datasets)
    from kdbench.job import ObtainedTeachers, Trainee, prepare
    from kdbench.loggers import create_logger
    from kdbench.distill import Options
    from kdbench.record import RunRecord
    from kdbench.train import begin_epoch, end_epoch, epoch_seed, train_batch

    ckpt = random_teacher(workdir, classes=CLASSES)
    overrides = ["dataset=synthetic", f"dataset.num_classes={CLASSES}", f"dataset.train_size={BATCH * (steps + 5)}",
                 "dataset.test_size=64", f"trainer.batch_size={BATCH}", "trainer.epochs=1", "trainer.progress=false",
                 f"trainer.precision={precision}", f"trainer.compile={str(compile_).lower()}",
                 f"trainer.device={device.type}", "teacher=resnet32x4", f"teacher.checkpoint={ckpt}",
                 "student=resnet8x4", "method=kd", "logger=none", "method.weights.ce=0.1", "method.weights.kd=0.9",
                 f"trainer.channels_last={str(channels_last).lower()}", f"paths.root={workdir}",
                 "trainer.teacher_view_cache=off"]
    job = job_of(overrides)
    device_, data = prepare(job)
    from kdbench.job import obtain_teacher

    teacher, source = obtain_teacher(job.teacher, job.teacher_store, data, device_)
    record = RunRecord.start(workdir / "run", config=job.config, config_hash=job.key, labels=job.labels, seed=1,
                             overrides=[], writes=False)
    trainee = Trainee(job, workdir / "run", record, create_logger(Options({"name": "none"}), workdir, {}, {}),
                      __import__("kdbench.distributed", fromlist=["SINGLE"]).SINGLE, data, device_,
                      ObtainedTeachers([teacher], [source], [0.0]))
    trainee.attach(trainee.own_teacher_outputs())
    member = trainee.member()
    run = member.run
    run.step.set_lr(0.05)
    tally = begin_epoch(run, 1)
    t0 = None
    for i, batch in enumerate(run.loader.epoch(epoch_seed(run.seed, 1))):
        if i == 5:
            _sync(device)
            t0 = time.perf_counter()
        train_batch(run, tally, batch)
    end_epoch(run, tally)  # the epoch's one host sync
    _sync(device)
    return steps * BATCH / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="reference DataLoader workers")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--variants", nargs="+", default=["plain", "channels_last", "compile"],
                        help="kdbench variants: plain, channels_last, compile (torch.compile of the forwards)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} cpu={platform.processor()} "
          f"steps={args.steps} batch={BATCH} repeats={args.repeats}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precision:
            sides = {"reference": lambda: reference_loop(args.steps, device, precision, args.workers)}
            for variant in args.variants:
                sides[f"kdbench {variant}"] = (lambda v=variant: kdbench_loop(
                    args.steps, device, precision, v == "compile", v in ("channels_last", "compile"), Path(tmp)))
            rates = {name: [] for name in sides}
            for _ in range(args.repeats):  # interleaved, so that drift in the machine's load hits every side alike
                for name, fn in sides.items():
                    rates[name].append(fn())
            ref = statistics.mean(rates["reference"])
            for name, xs in rates.items():
                mean, std = statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0
                results[f"{precision} {name}"] = {"images_per_s": mean, "std": std, "n": len(xs),
                                                  "ratio_vs_reference": mean / ref}
                print(f"{precision:>5} {name:<24} {mean:9.1f} ± {std:6.1f} images/s (n={len(xs)})  "
                      f"{mean / ref:5.2f}x reference", flush=True)
    print(f"peak memory: {_peak_mb(device):.0f} MB ({'max allocated' if device.type == 'cuda' else 'max RSS'})")
    if args.out:
        args.out.write_text(json.dumps({"argv": sys.argv[1:], "device": str(device), "torch": torch.__version__,
                                        "results": results}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("KDBENCH_RUN", "bench")
    main()
