"""Ablation (not a proposal): turn OFF tether's prompt-shared groups to measure what they are worth.

tether's sampler prefills each prompt once and repeats its KV cache for the n samples; HF `generate` (and so
TRL) repeats the prompt n times and prefills every copy. `apply()` makes tether do the same: every prompt
expanded n times, sampled with n = 1. Only for the `generate` workload (the grouping of the result changes).
"""

from __future__ import annotations

import dataclasses


def apply() -> None:
    from tether.rollout import sampler

    original = sampler.BuiltinSampler.generate

    def generate(self, prompts, params):
        expanded = [p for p in prompts for _ in range(params.n)]
        return original(self, expanded, dataclasses.replace(params, n=1))

    sampler.BuiltinSampler.generate = generate
