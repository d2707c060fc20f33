"""Atomic checkpoints: written to a temporary folder, renamed when complete, rotated with keep_last.

A checkpoint folder `checkpoints/step-N/` holds the model as a Hugging Face folder (`model/`) and
`trainer_state.pt` (optimizer, scheduler, every RNG, step, data position and recipe extras), which is
read back with `torch.load(weights_only=True)`.

Checkpoints do not depend on how the run was spread over processes: the model is saved whole (gathered
from FSDP2 shards), the optimizer state is keyed by parameter name and whole, and loading re-shards both
for the current ranks. So a checkpoint written by N ranks (DDP or FSDP) resumes with any other number.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from tether.models import is_peft, save as save_model, unwrap
from tether.runtime import distributed
from tether.runtime.device import rng_state, set_rng_state

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.pt"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first; temporary (half-written) folders are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _state_dict_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def gather_model_state(model) -> dict | None:
    """The whole model's weights on CPU on rank 0 when `model` is FSDP-sharded ({} on the other ranks);
    None when the model already holds whole weights. Every rank must call it (a collective under FSDP)."""
    if not distributed.is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_dict_options(full_state_dict=True, cpu_offload=True))


def gather_optimizer_state(model, optimizer) -> dict:
    """The optimizer state keyed by parameter name (not position), whole and on CPU, so that it loads into
    any number of ranks and either strategy. Every rank must call it (a collective under FSDP); only rank 0
    gets the state, the others {}."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sharded = distributed.is_fsdp(model)
    if not sharded and not distributed.is_main():
        return {}  # DDP replicas hold the same state as rank 0: no copy needed
    return get_optimizer_state_dict(model, optimizer, options=_state_dict_options(full_state_dict=sharded,
                                                                                  cpu_offload=True))


def save_model_folder(model, tokenizer, path: str | Path, *, state: dict | None = None,
                      merge_lora: bool = False) -> None:
    """A Hugging Face folder of `model`; `state` is its gathered weights when it is FSDP-sharded
    (`gather_model_state`), None to save the model's own weights."""
    if state is None:
        save_model(model, tokenizer, path, merge_lora=merge_lora)
        return
    model = unwrap(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # A tied weight (lm_head = embed_tokens) appears under two names; save it once, as from_pretrained expects.
    seen, aliases = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    model.save_pretrained(path, state_dict={k: v for k, v in state.items() if k not in aliases},
                          safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def save_checkpoint(root: str | Path, step: int, *, model, tokenizer, optimizer, scheduler,
                    extra: dict | None = None, keep_last: int = 2, model_state: dict | None = None,
                    optimizer_state: dict | None = None, rng_ranks: list | None = None) -> Path:
    """Write `root/step-N/` atomically (called by rank 0 only). Under FSDP pass the gathered `model_state`
    and `optimizer_state` (`gather_*`, called on every rank); `rng_ranks` holds every rank's RNG state."""
    root = Path(root)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    if optimizer_state is None:
        optimizer_state = gather_optimizer_state(model, optimizer)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        save_model_folder(model, tokenizer, tmp / "model", state=model_state)
        state = {
            "step": step,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "rng_ranks": rng_ranks or [rng_state()],
            "extra": extra or {},
        }
        torch.save(state, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
                  errno.EACCES: "permission denied"}.get(err.errno, str(err))
        raise OSError(err.errno, f"cannot write checkpoint step-{step} in {root}: {reason}; "
                                 f"earlier checkpoints are intact") from None
    for leftover in root.glob(".tmp-step-*"):  # writes killed before their rename: never complete, only garbage
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last > 0:  # keep the checkpoint just written (even below a stale higher step) and the newest others
        others = [path for path in complete_checkpoints(root) if path != final]
        for old in others[:max(0, len(others) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _check_keys(folder: Path, model, missing, unexpected) -> None:
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {folder} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def load_model_weights(model, folder: Path) -> None:
    """Load the weights saved in `folder` into `model` in place (full model or LoRA adapter). An FSDP-sharded
    model is loaded by rank 0, which sends each rank its shard (every rank must call it then)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    sharded = distributed.is_fsdp(model)
    state = {}
    if distributed.is_main() or not sharded:
        for file in files:
            state.update(load_file(str(file)))
    if sharded:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        result = set_model_state_dict(model, state, options=_state_dict_options(
            full_state_dict=True, broadcast_from_rank0=True, strict=False))
        _check_keys(folder, model, result.missing_keys, result.unexpected_keys)
        return
    model = unwrap(model)
    if is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    _check_keys(folder, model, missing, unexpected)


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Load a saved optimizer state (keyed by parameter name) into `optimizer`, sharding it under FSDP."""
    if state.get("state") and all(isinstance(k, int) for k in state["state"]):  # older, position-keyed format
        if distributed.is_fsdp(model):
            raise RuntimeError("this checkpoint's optimizer state is keyed by position; it cannot be loaded into "
                               "an FSDP-sharded model (resume it with distributed.strategy=ddp)")
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if distributed.is_fsdp(model):  # rank 0 sends each rank its shard
        set_optimizer_state_dict(model, optimizer, state if distributed.is_main() else {},
                                 options=_state_dict_options(full_state_dict=True, broadcast_from_rank0=True))
    else:
        set_optimizer_state_dict(model, optimizer, state)


def load_checkpoint(path: Path, *, model, optimizer, scheduler) -> tuple[int, dict]:
    """Restore model, optimizer, scheduler and RNG from `path`; returns (step, extra).

    Every rank calls it and reads the files (so `output_dir` must be on storage every node sees). Each rank
    gets back its own RNG state when the number of ranks is unchanged, rank 0's otherwise.
    """
    load_model_weights(model, path / "model")
    state = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu", mmap=True)
    load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_ranks = state.get("rng_ranks") or []
    same_ranks = len(rng_ranks) == distributed.world_size()
    rng = dict(rng_ranks[distributed.rank()] if same_ranks else state["rng"])
    if "cuda" in rng and torch.cuda.is_available():  # written on a machine with more GPUs, perhaps
        rng["cuda"] = rng["cuda"][:torch.cuda.device_count()]
    set_rng_state(rng)
    return state["step"], state["extra"]


def link_final(out: Path, model_dir: Path) -> Path:
    """`out/final` → `model_dir` (a relative symlink), so every recipe's model is at `<output_dir>/final`.
    Returns `model_dir` itself when it is not a folder under `out` (e.g. nothing was trained)."""
    final = out / "final"
    if not model_dir.is_dir() or out.resolve() not in model_dir.resolve().parents:
        return model_dir
    if distributed.is_main():
        if final.is_symlink() or final.exists():
            final.unlink()
        final.symlink_to(os.path.relpath(model_dir.resolve(), out.resolve()), target_is_directory=True)
    distributed.barrier()
    return final
