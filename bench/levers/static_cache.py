"""Lever "preallocated KV cache": the sampler writes keys and values into a cache allocated once for
prompt + max_new_tokens positions (transformers' StaticCache) instead of concatenating a growing cache each
step (DynamicCache: one torch.cat per layer per step, copying the whole cache).

Proposed for tether/rollout/sampler.py; `apply()` patches a running tether so the benchmark can measure it.
The cost: attention reads all max_cache_len positions every step (the unfilled ones are masked).
"""

from __future__ import annotations

from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from levers import use_cache


def apply() -> None:
    def repeat_rows(layer, repeats: int) -> None:  # n samples per prompt share one prefill
        layer.keys = layer.keys.repeat_interleave(repeats, dim=0)
        layer.values = layer.values.repeat_interleave(repeats, dim=0)

    def select_rows(layer, indices) -> None:  # drop finished rows
        layer.keys, layer.values = layer.keys[indices], layer.values[indices]

    StaticLayer.batch_repeat_interleave = repeat_rows
    StaticLayer.batch_select_indices = select_rows
    use_cache(lambda max_len, config: StaticCache(config=config, max_cache_len=max_len))
