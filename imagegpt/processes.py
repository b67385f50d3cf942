"""Where a training run computes: its device and, under torchrun, its place among the DDP processes (the
process group, the counts summed over the processes, a stop agreed by all)."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from imagegpt.device import resolve_device


@dataclass
class Processes:
    """Where this process trains: its device, and its place among the DDP processes (torchrun)."""
    device: str
    rank: int = 0
    world: int = 1

    @property
    def ddp(self):
        return self.world > 1

    @property
    def master(self):
        return self.rank == 0

    @property
    def cuda(self):
        return self.device.startswith("cuda")


def setup_processes(cfg):
    """Resolve the device, join the DDP process group under torchrun (NCCL on CUDA, gloo on CPU)."""
    device = resolve_device(cfg.device, "config: device")
    procs = Processes(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if procs.cuda else "gloo")
        procs.rank, procs.world = dist.get_rank(), dist.get_world_size()
        if procs.cuda:
            procs.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(procs.device)
    if procs.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return procs


def step_counts(micro, procs):
    """(loss weight sum, real target tokens) of the global batch: this process's micro-batches (x, y, w),
    summed over the processes. Integers, exact in float32."""
    t = torch.tensor([sum(float(w.sum()) for _, _, w in micro), sum(int((y != -100).sum()) for _, y, _ in micro)],
                     dtype=torch.float64, device=procs.device)
    if procs.ddp:
        dist.all_reduce(t)
    return t[0].float(), int(t[1])


def any_process(flag, device):
    """True on every DDP process if `flag` is True on any (a Ctrl-C reaches each at its own time)."""
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t)
    return t.item() > 0
