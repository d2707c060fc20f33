"""Lever "preallocated KV cache": the sampler writes keys and values into a cache allocated once for
prompt + max_new_tokens positions (transformers' StaticCache) instead of concatenating a growing cache each
step (DynamicCache: one torch.cat per layer per step, copying the whole cache).

Proposed for tether/rollout/sampler.py; `apply()` patches a running tether so the benchmark can measure it.
The cost: attention reads all max_cache_len positions every step (the unfilled ones are masked).
"""

from __future__ import annotations

import functools
import importlib

from transformers import StaticCache
from transformers.cache_utils import StaticLayer

_LENGTH = {}


def apply() -> None:
    from tether.rollout import sampler

    # Measured on the model's own forward (Hugging Face caches); the lean Llama decode path that came later
    # (tether.rollout.llama_decode) keeps its own preallocated cache, so it is turned off here.
    importlib.import_module("levers.model_decode").apply()

    original = sampler.BuiltinSampler._generate_chunk

    @functools.wraps(original)
    def generate_chunk(self, prompt_ids, params, generator, device):
        _LENGTH["max"] = max(len(p) for p in prompt_ids) + params.max_new_tokens
        return original(self, prompt_ids, params, generator, device)

    def make_cache(config=None, **kwargs):
        return StaticCache(config=config, max_cache_len=_LENGTH["max"])

    def repeat_rows(layer, repeats: int) -> None:  # n samples per prompt share one prefill
        layer.keys = layer.keys.repeat_interleave(repeats, dim=0)
        layer.values = layer.values.repeat_interleave(repeats, dim=0)

    def select_rows(layer, indices) -> None:  # drop finished rows
        layer.keys, layer.values = layer.keys[indices], layer.values[indices]

    StaticLayer.batch_repeat_interleave = repeat_rows
    StaticLayer.batch_select_indices = select_rows
    sampler.BuiltinSampler._generate_chunk = generate_chunk
    sampler.DynamicCache = make_cache
