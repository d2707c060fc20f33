"""Atomic checkpoints: written to a temporary folder, renamed when complete, rotated with keep_last.

A checkpoint folder `checkpoints/step-N/` holds the model as a Hugging Face folder (`model/`) and
`trainer_state.pt` (optimizer, scheduler, every RNG, step, data position and recipe extras), which is
read back with `torch.load(weights_only=True)`.
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


def save_checkpoint(root: str | Path, step: int, *, model, tokenizer, optimizer, scheduler,
                    extra: dict | None = None, keep_last: int = 2) -> Path:
    root = Path(root)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        save_model(model, tokenizer, tmp / "model")
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
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
    for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_model_weights(model, folder: Path) -> None:
    """Load the weights saved in `folder` into `model` in place (full model or LoRA adapter)."""
    model = unwrap(model)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    if is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {folder} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def load_checkpoint(path: Path, *, model, optimizer, scheduler) -> tuple[int, dict]:
    """Restore model, optimizer, scheduler and RNG from `path`; returns (step, extra)."""
    load_model_weights(model, path / "model")
    state = torch.load(path / STATE_FILE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"], state["extra"]
