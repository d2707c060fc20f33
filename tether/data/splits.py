"""Held-out splits of a loaded dataset (seeded, so every rank and a resumed run hold out the same rows)."""

from __future__ import annotations

import torch

from tether.config import ConfigError


def split_held_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held_out): a seeded random `fraction` of `items` held out (at least one when fraction > 0)."""
    if fraction <= 0:
        return items, []
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(items), generator=generator).tolist()
    n_held = max(1, int(round(fraction * len(items))))
    if n_held >= len(items):
        raise ConfigError(f"config key 'eval_fraction': {fraction} of {len(items)} pairs leaves none to train on")
    held = set(order[:n_held])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
