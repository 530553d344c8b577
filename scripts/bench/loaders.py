"""Throughput of the two data paths on CIFAR-shaped data, side by side in one run.

    python scripts/bench/loaders.py [--device cuda] [--samples 50000] [--batch 64] [--repeats 3]

DeviceLoader keeps the split on the device and crops/flips there; StreamLoader streams host tensors through a
DataLoader and augments on the device. Reports images/s (mean ± std over repeats, n) and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdbench.data import Augment, DeviceLoader, Split, StreamLoader


def images_per_second(loader, device) -> float:
    start = time.perf_counter()
    n = 0
    for batch in loader.epoch(seed=0):
        n += len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    split = Split(torch.randint(0, 256, (args.samples, 3, 32, 32), dtype=torch.uint8), torch.arange(args.samples) % 100)
    common = (args.batch, [0.5] * 3, [0.25] * 3, device)
    loaders = {"device": DeviceLoader(split, *common, augment=Augment(4, True), shuffle=True),
               "stream": StreamLoader(split, *common, augment=Augment(4, True), shuffle=True, num_workers=args.workers)}
    results = {name: [images_per_second(loader, device) for _ in range(args.repeats)] for name, loader in loaders.items()}
    print(f"device={device} samples={args.samples} batch={args.batch} n={args.repeats}")
    for name, xs in results.items():
        print(f"{name:>7}: {statistics.mean(xs):12,.0f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:10,.0f} images/s")
    print(f"  ratio device/stream: {statistics.mean(results['device']) / statistics.mean(results['stream']):.2f}x")


if __name__ == "__main__":
    main()
