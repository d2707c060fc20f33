"""torch.distributed under torchrun: process-group set-up, rank helpers and reductions.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one process.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init(timeout_s: float = 600.0) -> None:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); nothing for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of `value` over ranks (a copy; the input is untouched)."""
    value = value.detach().clone()
    if world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(value) / world_size()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shard(indices: list[int]) -> list[int]:
    """This rank's contiguous share of a global batch of indices (the batch size divides evenly)."""
    n, r = world_size(), rank()
    if len(indices) % n:
        raise ValueError(f"batch of {len(indices)} does not split evenly over {n} ranks")
    size = len(indices) // n
    return indices[r * size: (r + 1) * size]
