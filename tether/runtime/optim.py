"""AdamW with warm-up and a decay schedule; one guarded optimizer step shared by every recipe."""

from __future__ import annotations

import math

import torch


def build_optimizer(params, *, learning_rate: float, weight_decay: float = 0.0, betas=(0.9, 0.999)):
    """AdamW; the fused single-kernel implementation (CPU and CUDA, torch >= 2.4) when every parameter allows it:
    the same update as the for-loop one (TRL gets it through transformers' default optim="adamw_torch_fused")."""
    params = [p for p in params if p.requires_grad]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, betas=tuple(betas),
                             fused=True if fused else None)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at `step`: linear warm-up, then cosine/linear/constant decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler {schedule!r}; expected cosine, linear or constant")


def build_scheduler(optimizer, *, total_steps: int, warmup_steps: int, schedule: str):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule)
    )


class NonFiniteLossError(RuntimeError):
    pass


class StepGuard:
    """Skips an update whose gradient norm is NaN/inf; stops the run after `max_in_a_row` such steps."""

    def __init__(self, max_in_a_row: int = 5):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.skipped = 0

    def state_dict(self) -> dict:
        return {"in_a_row": self.in_a_row, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.in_a_row, self.skipped = state["in_a_row"], state["skipped"]

    def step(self, model, optimizer, scheduler, max_grad_norm: float) -> tuple[torch.Tensor, bool]:
        """Clip, check and apply the accumulated gradients. Returns (grad_norm, applied)."""
        params = [p for p in model.parameters() if p.grad is not None]
        if max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])) \
                if params else torch.zeros(())
        applied = bool(torch.isfinite(grad_norm))
        if applied:
            optimizer.step()
            self.in_a_row = 0
        else:
            self.skipped += 1
            self.in_a_row += 1
            if self.in_a_row >= self.max_in_a_row:
                raise NonFiniteLossError(
                    f"{self.in_a_row} steps in a row had a non-finite loss or gradient norm; stopping. "
                    "The last good checkpoint is kept: lower learning_rate or check the data, then resume=true."
                )
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach(), applied
