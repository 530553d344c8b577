"""One job on several processes: torch.distributed, started by torchrun or by Slurm tasks (Hydra's submitit launcher).
kdbench starts no processes itself; it reads where it is from the environment those launchers set.

  torchrun --nproc_per_node=2 -m kdbench.cli method=kd ...          RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
  kdbench hydra/launcher=submitit_slurm hydra.launcher.tasks_per_node=4 ...   submitit's job environment

How a distributed job trains (the same numbers as one process with the same global batch, up to float rounding):
  - every epoch's plan (order, augmentation) is the single-process one; each rank takes every world-th sample of each
    global batch (kdbench.data.loader), so a resumed or re-sharded run replays the same samples
  - after each backward the gradients are averaged over ranks, weighted by each rank's share of the global batch
    (one all-reduce of a flat buffer, DistributedDataParallel's reduction done explicitly: a method's heads and DOT's
    two backward passes take part like the student's parameters); BatchNorm buffers are broadcast from rank 0
    before every evaluation, as DDP's broadcast_buffers does at each forward
  - every rank runs the teacher on its samples; test metrics are summed over ranks; only rank 0 writes the record,
    the checkpoints, the teacher store and the leaderboard
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def _submitit_export() -> None:
    """Inside a Slurm job of several tasks (submitit), set the torch.distributed variables torchrun would."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    try:
        import submitit
    except ImportError:
        return
    try:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except RuntimeError:  # not inside a submitit job (a plain srun)
        return


def world() -> World:
    """This process's place, from torchrun's (or submitit's) environment; a single process otherwise."""
    _submitit_export()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(w: World, device: torch.device) -> None:
    """The default process group (NCCL on GPUs, gloo on CPUs), once per process."""
    if w.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=w.rank, world_size=w.size)


def agree(value: bool, w: World) -> bool:
    """The first rank's value, on every rank."""
    if not w.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def barrier(w: World) -> None:
    if w.distributed:
        dist.barrier()


def all_sum(values: Sequence[float | int], w: World, device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (test counts, losses)."""
    if not w.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_sum_tensor(t: torch.Tensor, w: World) -> torch.Tensor:
    if w.distributed:
        dist.all_reduce(t)
    return t


def average_gradients(grads: Iterable[torch.Tensor], share: float, w: World) -> None:
    """In place: grad = sum over ranks of (share_rank * grad_rank), share = the rank's part of the global batch.
    One all-reduce over a flat buffer."""
    if not w.distributed:
        return
    grads = [g for g in grads if g is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).mul_(share)
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_buffers(module: torch.nn.Module, w: World) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank."""
    if not w.distributed:
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


def all_gather_cat(t: torch.Tensor, w: World) -> torch.Tensor:
    """Every rank's tensor (equal shapes but dim 0), concatenated in rank order."""
    if not w.distributed:
        return t
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(w.size)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], device=t.device))
    biggest = int(max(s.item() for s in sizes))
    padded = torch.zeros(biggest, *t.shape[1:], dtype=t.dtype, device=t.device)
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(w.size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])
