"""Ablation (not a proposal): turn OFF the two-level inverse-CDF token draw for large vocabularies
(`sampler.draw_inverse_cdf`), so every draw goes through `sampler.draw` (a float64 copy of the (B, V) weights and
its prefix sum; before session 3 that path was the exponential race, V random numbers per row, which is what
the recorded 5.87x on vocab150k generation was measured against). It raises the vocabulary threshold of the
kept code instead of copying it."""

from __future__ import annotations


def apply() -> None:
    from tether.rollout import sampler

    sampler.INVERSE_CDF_MIN_VOCAB = float("inf")
