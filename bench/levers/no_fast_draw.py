"""Ablation (not a proposal): turn OFF the inverse-CDF token draw for large vocabularies
(`sampler.draw_inverse_cdf`), so every draw is the exponential race over the whole vocabulary, as before that
lever was kept. It raises the vocabulary threshold of the kept code instead of copying it."""

from __future__ import annotations


def apply() -> None:
    from tether.rollout import sampler

    sampler.INVERSE_CDF_MIN_VOCAB = float("inf")
