"""Lever "fused AdamW": torch's single-kernel AdamW (`fused=True`, on CPU since torch 2.4; TRL gets it through
transformers' default `optim="adamw_torch_fused"`) instead of the per-parameter for-loop implementation.

Proposed for tether/runtime/optim.py (`build_optimizer`); `apply()` patches a running tether.
"""

from __future__ import annotations

import torch


def build_optimizer(params, *, learning_rate: float, weight_decay: float = 0.0, betas=(0.9, 0.999)):
    params = [p for p in params if p.requires_grad]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                for p in params)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, betas=tuple(betas),
                             fused=fused or None)


def apply() -> None:
    from tether.runtime import optim, run

    optim.build_optimizer = build_optimizer
    run.build_optimizer = build_optimizer
