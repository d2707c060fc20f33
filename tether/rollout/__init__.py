"""Samplers: one interface (`Sampler.generate(prompts, SamplingParams) -> RolloutBatch`) over the built-in
batched KV-cache engine (default) and vLLM (CUDA, when installed). See docs/generation.md.

`SamplingParams` and `SamplingConfig` (tether.rollout.params) are plain Python and load at once; the engine
names below load torch on first use (PEP 562), so a config can hold sampling settings before torch loads.
"""

import importlib

from tether.rollout.params import SamplingConfig, SamplingParams

_FROM_SAMPLER = ("FINISH_REASONS", "BuiltinSampler", "RolloutBatch", "Sampler", "filter_logits", "get_sampler",
                 "select_tokens")

__all__ = ["FINISH_REASONS", "BuiltinSampler", "RolloutBatch", "Sampler", "SamplingConfig", "SamplingParams",
           "filter_logits", "get_sampler", "select_tokens"]


def __getattr__(name: str):
    if name in _FROM_SAMPLER:
        return getattr(importlib.import_module("tether.rollout.sampler"), name)
    raise AttributeError(f"module 'tether.rollout' has no attribute {name!r}")
