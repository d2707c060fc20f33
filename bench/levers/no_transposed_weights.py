"""Ablation (not a proposal): the lean decode step's weights stored as the model stores them, (out, in), so each
matmul reads its weight transposed, as before session 6 (`x @ W.T`); the kept layout is (in, out), contiguous."""

from __future__ import annotations


def apply() -> None:
    from tether.rollout import llama_decode

    original = llama_decode._Layer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for name in ("qkv_weight_t", "o_weight_t", "gate_up_weight_t", "down_weight_t"):
            weight = getattr(self, name)  # (in, out), contiguous
            setattr(self, name, weight.T.contiguous().T)  # the same values over (out, in) memory

    llama_decode._Layer.__init__ = init
