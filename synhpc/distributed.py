"""Process-group set-up for data-parallel training, from the environment torchrun or submitit exports.

Usage::

    dist = init_from_env()          # RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; a no-op for one process
    if dist.is_main: save(...)
    any_rank(stop.requested, dist)  # so every rank stops at the same step
    cleanup(dist)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env() -> DistInfo:
    """Join the process group named by the environment: gloo on CPU, nccl on GPU (one GPU per local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local, device)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` is true on any rank (a preemption signal reaches ranks at different moments)."""
    if info.world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=info.device)
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def cleanup(info: DistInfo) -> None:
    if info.world_size > 1 and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def broadcast_from_main(tensors: list[torch.Tensor], info: DistInfo) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values (e.g. BatchNorm statistics, which each rank
    accumulates from its own batches while gradients keep the parameters identical)."""
    if info.world_size == 1:
        return
    for tensor in tensors:
        torch_dist.broadcast(tensor, src=0)
