"""Ablation (not a proposal): turn OFF prompt-shared attention in the lean decode path
(`LlamaDecoder._attend_grouped`), so each sample attends over its own copy of the prompt's keys and values, as
the first version of the path did."""

from __future__ import annotations


def apply() -> None:
    from tether.rollout import llama_decode

    original = llama_decode.LlamaDecoder.load_cache

    def load_cache(self, cache, attention_mask, repeats: int = 1) -> None:
        original(self, cache, attention_mask, repeats)
        if self.grouped:
            self._flatten()

    llama_decode.LlamaDecoder.load_cache = load_cache
