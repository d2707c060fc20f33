"""Lever "preallocated KV cache, growing view": each layer's keys/values live in one buffer allocated for
prompt + max_new_tokens positions; a step writes its new position in place and attention reads the filled
prefix as a view (no torch.cat copy of the whole cache per layer per step, and no attention over unfilled
positions as with transformers' StaticCache).

Proposed for tether/rollout/sampler.py; `apply()` patches a running tether so the benchmark can measure it.
"""

from __future__ import annotations

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from levers import use_cache


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose storage is preallocated; `keys`/`values` are views of the filled prefix."""

    def __init__(self, max_length: int, **kwargs):
        super().__init__(**kwargs)
        self.max_length = max_length

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        B, H, _, D = key_states.shape
        self._keys = key_states.new_empty(B, H, self.max_length, D)
        self._values = value_states.new_empty(B, H, self.max_length, value_states.shape[-1])
        self.length = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._keys = self._keys.repeat_interleave(repeats, dim=0)
        self._values = self._values.repeat_interleave(repeats, dim=0)
        self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]

    def batch_select_indices(self, indices) -> None:
        self._keys, self._values = self._keys[indices], self._values[indices]
        self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]


def make_cache(max_len: int, config) -> DynamicCache:
    cache = DynamicCache(config=config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):  # sliding-window models keep theirs
        cache.layers = [GrowingLayer(max_len) for _ in cache.layers]
    return cache


def apply() -> None:
    use_cache(make_cache)
