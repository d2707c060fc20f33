"""torch.distributed under torchrun: process-group set-up, rank helpers, reductions, model wrapping (DDP or
FSDP2) and a readable message when another rank dies or hangs.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one process.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from tether.models import is_fsdp  # noqa: F401  (re-exported)
from tether.ops import masked_whiten

log = logging.getLogger("tether")

_timeout_s: float | None = None  # the process group's collective timeout, for the failure message
_owned_group = [False]  # did `init` make the process group (and so must leave it)?


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK): the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def init(timeout_s: float = 600.0) -> None:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); nothing for one process.

    `timeout_s` bounds every collective: when another rank dies or hangs, this rank's next collective
    raises after that long instead of waiting forever (see `failure_message`).
    """
    global _timeout_s
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    kwargs = {}
    if torch.cuda.is_available():
        backend = "nccl"
        kwargs["device_id"] = torch.device("cuda", local_rank())
        torch.cuda.set_device(kwargs["device_id"])
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    _timeout_s = timeout_s
    _owned_group[0] = True
    atexit.register(shutdown)
    if not is_main():  # one copy of the run's info lines, from rank 0; warnings still come from every rank
        log.setLevel(logging.WARNING)
    log.info("torch.distributed: %d ranks, backend %s, collective timeout %g s", world_size(), backend, timeout_s)


def shutdown() -> None:
    """Leave the process group `init` joined. A group someone else made is left alone: an in-process vLLM
    engine makes a one-rank group of its own and tears it down at exit itself."""
    if _owned_group[0] and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _owned_group[0] = False


def exit_worker(code: int) -> None:
    """End a torchrun worker whose work is done and written: leave the process group, run the exit handlers,
    flush, and exit without tearing the interpreter down. Nothing for one process.

    Why: FSDP2's DTensor caches (sharding propagation, redistribution plans) keep the device mesh, and through
    it the gloo process group, alive after `destroy_process_group()`. The group is then freed during interpreter
    teardown, where stopping gloo's threads sometimes aborts the finished process ("terminate called without an
    active exception", SIGABRT) and torchrun reports the whole job as failed.
    """
    if not (_owned_group[0] and dist.is_available() and dist.is_initialized()):
        return
    shutdown()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of `value` over ranks (a copy; the input is untouched)."""
    value = value.detach().clone()
    if world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(value) / world_size()


def all_gather_object(value) -> list:
    """[value of rank 0, value of rank 1, ...] on every rank (picklable values)."""
    if world_size() == 1:
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_gather_cat(value: torch.Tensor) -> torch.Tensor:
    """Every rank's `value` concatenated along dim 0, rank 0's first (same shape on every rank), e.g. the
    rewards of the whole global batch (N_local,) → (world_size * N_local,)."""
    if world_size() == 1:
        return value.detach().clone()
    parts = [torch.empty_like(value) for _ in range(world_size())]
    dist.all_gather(parts, value.detach().contiguous())
    return torch.cat(parts)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shard(indices: list[int]) -> list[int]:
    """This rank's contiguous share of a global batch of indices (the batch size divides evenly)."""
    n, r = world_size(), rank()
    if len(indices) % n:
        raise ValueError(f"a global batch of {len(indices)} does not split evenly over {n} ranks: "
                         f"make batch_size a multiple of {n}")
    size = len(indices) // n
    return indices[r * size: (r + 1) * size]


def shard_chunks(count: int, chunk_size: int) -> range:
    """This rank's contiguous share of `count` items dealt out in whole chunks of `chunk_size` (the last chunk may
    be shorter): the chunks split as evenly as they can, earlier ranks taking one more, so a rank may get none.
    E.g. 10 items in chunks of 2 over 2 ranks: range(0, 6) and range(6, 10).

    For work whose result depends on how items are grouped (sampling draws one random stream per chunk):
    every chunk is the same whatever the number of ranks. Unlike `shard`, `count` need not divide evenly."""
    chunks = -(-count // chunk_size)
    n, r = world_size(), rank()
    first = r * (chunks // n) + min(r, chunks % n)  # chunks before this rank's
    last = first + chunks // n + (r < chunks % n)
    return range(min(first * chunk_size, count), min(last * chunk_size, count))


def gather_lists(items: list) -> list:
    """Every rank's `items` (picklable) concatenated in rank order, on every rank: with `shard_chunks`, the
    results of all items in their original order."""
    return [item for part in all_gather_object(items) for item in part]


# ----------------------------------------------------------------------------- model wrapping

def is_wrapped(model) -> bool:
    """True when `model` averages its gradients over ranks (DDP or FSDP2)."""
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel) or is_fsdp(model)


def wrap(model: torch.nn.Module, strategy: str, device: torch.device) -> torch.nn.Module:
    """The trainable `model` made data-parallel over all ranks; unchanged in a single process.

    ddp: `DistributedDataParallel` (every rank holds the whole model; gradients are averaged in backward).
    fsdp: FSDP2 `fully_shard` on every transformer block, then on the whole model (parameters, gradients
    and optimizer state are split over ranks; each block's weights are gathered just for its forward and
    backward). Either way gradients are *averaged* over ranks, so a recipe backpropagates its rank's share
    of the global-batch loss times `world_size()`.
    Build the optimizer from the returned model's parameters (FSDP replaces them with shards).
    """
    if world_size() == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index if device.index is not None else local_rank()] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world_size(),))
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"distributed.strategy {strategy!r}: expected 'ddp' or 'fsdp'")


@torch.no_grad()
def replicas_differ(model: torch.nn.Module) -> bool:
    """True when the ranks' copies of a DDP model's trainable weights are no longer equal (its gradients
    are not being averaged: e.g. the forward bypassed the DDP wrapper). False for FSDP and one process."""
    if world_size() == 1 or is_fsdp(model):
        return False
    sums = [p.detach().double().sum() for p in model.parameters() if p.requires_grad]
    if not sums:
        return False
    local = torch.stack(sums)  # (P,) one checksum per trainable tensor
    low, high = local.clone(), local.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(((high - low).abs() > 1e-6 * (1 + local.abs())).any())


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated layers of a Hugging Face model (the classes it lists in `_no_split_modules`)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


# ----------------------------------------------------------------------------- failures

# Fragments of the errors gloo/nccl raise when a peer is gone or silent.
_TIMEOUT_MARKERS = ("timed out", "timeout", "watchdog")
_LOST_PEER_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
                      "socket closed", "recv", "send", "remote process exited", "ncclremoteerror")


def failure_message(err: BaseException) -> str | None:
    """A one-line explanation when `err` is a collective that failed because another rank died or hung;
    None for any other error (and always in a single process)."""
    if world_size() == 1 or not isinstance(err, RuntimeError):
        return None
    text = str(err).lower()
    is_dist_error = isinstance(err, getattr(dist, "DistError", ())) or "gloo" in text or "nccl" in text
    waited = f"{_timeout_s:g} s" if _timeout_s is not None else "distributed.timeout_s"
    first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    if any(m in text for m in _TIMEOUT_MARKERS) and is_dist_error:
        return (f"rank {rank()}: collective timed out after {waited} — another rank died or hung; see its log "
                f"(the limit is distributed.timeout_s). [{first_line}]")
    if any(m in text for m in _LOST_PEER_MARKERS) and is_dist_error:
        return (f"rank {rank()}: lost the connection to another rank during a collective — it died; "
                f"see its log. [{first_line}]")
    return None


# ----------------------------------------------------------------------------- statistics over all ranks


def own_rows(values: Tensor) -> Tensor:
    """This rank's rows of a tensor gathered over ranks with `all_gather_cat`."""
    n = values.shape[0] // world_size()
    return values[rank() * n:(rank() + 1) * n]


def global_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of `values` (where `mask` is 1) over every rank's batch."""
    mask = torch.ones_like(values) if mask is None else mask
    total = all_reduce_sum(torch.stack([(values * mask).sum(), mask.sum()]).float())
    return total[0] / total[1].clamp(min=1)


def global_var(values: Tensor, mask: Tensor) -> Tensor:
    """Unbiased variance of `values` where `mask` is 1, over every rank's batch."""
    mean = global_mean(values, mask)
    total = all_reduce_sum(torch.stack([((values - mean) ** 2 * mask).sum(), mask.sum()]).float())
    return total[0] / (total[1] - 1).clamp(min=1)


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(values − mean) / sqrt(var + eps) over the masked entries of the global batch; 0 where masked:
    `ops.masked_whiten` with every rank's mean and variance."""
    return masked_whiten(values, mask, eps=eps, mean=global_mean(values, mask), var=global_var(values, mask))

def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 − Var(R − V) / Var(R) over the masked tokens of the global batch: how much of the return the critic
    predicted (1 perfect, 0 no better than a constant)."""
    return 1 - global_var(returns - values, mask) / global_var(returns, mask).clamp(min=1e-8)


def masked_stats(values: Tensor, mask: Tensor, prefix: str) -> dict[str, Tensor]:
    """{prefix}_mean and {prefix}_std over the masked entries of the global batch."""
    return {f"{prefix}_mean": global_mean(values, mask), f"{prefix}_std": global_var(values, mask).sqrt()}
