"""Samplers: one interface (`Sampler.generate(prompts, SamplingParams) -> RolloutBatch`) over the built-in
batched KV-cache engine (default) and vLLM (CUDA, when installed). See docs/generation.md."""

from tether.rollout.sampler import (
    FINISH_REASONS,
    BuiltinSampler,
    RolloutBatch,
    Sampler,
    SamplingParams,
    filter_logits,
    get_sampler,
    select_tokens,
)

__all__ = ["FINISH_REASONS", "BuiltinSampler", "RolloutBatch", "Sampler", "SamplingParams", "filter_logits",
           "get_sampler", "select_tokens"]
