"""Ablation (not a proposal): turn OFF the fused C decode attention (`tether/rollout/decode_attention.c`), so the
lean decode path runs its attention in PyTorch ops, as before the kernel existed."""

from __future__ import annotations


def apply() -> None:
    from tether.rollout import native

    native._tried, native._library = True, None
