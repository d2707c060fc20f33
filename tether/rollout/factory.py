"""Pick a rollout engine by name: `get_sampler("builtin" | "vllm", model, tokenizer, **options)`."""

from __future__ import annotations

from tether.rollout.engine import Sampler
from tether.rollout.sampler import BuiltinSampler
from tether.rollout.vllm_engine import VLLMSampler

ENGINES = {"builtin": BuiltinSampler, "vllm": VLLMSampler}
"""Engine name -> class; every one implements `tether.rollout.engine.Sampler`."""


def get_sampler(engine: str, model, tokenizer, **kwargs) -> Sampler:
    """The sampler named `engine`: "builtin" (default, any HF causal LM) or "vllm" (CUDA, when installed)."""
    if engine in ENGINES:
        return ENGINES[engine](model, tokenizer, **kwargs)
    raise ValueError(f"rollout engine {engine!r} is unknown: use 'builtin' or 'vllm'")
