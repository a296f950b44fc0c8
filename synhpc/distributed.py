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

from synhpc.errors import DataError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def gpus_allocated() -> str:
    """The environment variable through which SLURM (or the user) handed this job GPUs, as ``NAME=value``; "" if none."""
    count = os.environ.get("SLURM_GPUS_ON_NODE", "").strip()
    if count.isdigit() and int(count) > 0:
        return f"SLURM_GPUS_ON_NODE={count}"
    # GPU index lists: "0" is a GPU; an empty list, -1 or NoDevFiles means none.
    for name in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(name, "").strip()
        if value and value not in ("-1", "NoDevFiles"):
            return f"{name}={value}"
    return ""


def resolve_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """The device to run on: ``cpu``, ``cuda``, or ``auto`` (CUDA when torch can use it).

    A GPU that was asked for but cannot be used is a one-line error, not a silent CPU run that takes 50x longer:
    ``cuda`` explicitly, or ``auto`` inside a job that SLURM gave GPUs (a broken driver, a CPU-only torch build, or a
    container started without ``--nv``).
    """
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    given = gpus_allocated()
    if requested == "cuda" or given:
        why = f"this job was given GPUs ({given})" if given else "train.device is cuda"
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        raise DataError(f"{why}, but torch cannot use CUDA ({build}; check the driver, `nvidia-smi`, and apptainer --nv); set train.device=cpu to run on the CPU anyway")
    return torch.device("cpu")


def init_from_env(device: str = "auto") -> DistInfo:
    """Join the process group named by the environment: gloo on CPU, nccl on GPU (one GPU per local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device_ = resolve_device(device, local)
    cuda = device_.type == "cuda"
    if cuda:
        torch.cuda.set_device(device_)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local, device_)


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
