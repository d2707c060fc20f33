

def use_cache(make_cache) -> None:
    """Make the sampler build its KV cache with `make_cache(max_len, config)`, max_len being the longest prompt
    plus max_new_tokens of the chunk it is generating (what a preallocated cache needs). The cache levers were
    measured on the model's own forward (Hugging Face caches); the lean Llama decode path that came later
    (tether.rollout.llama_decode) keeps its own preallocated cache, so it is turned off here."""
    import functools
    import importlib

    from tether.rollout import sampler

    importlib.import_module("levers.model_decode").apply()
    length = {}
    original = sampler.BuiltinSampler._generate_chunk

    @functools.wraps(original)
    def generate_chunk(self, prompt_ids, params, generator, device):
        length["max"] = max(len(p) for p in prompt_ids) + params.max_new_tokens
        return original(self, prompt_ids, params, generator, device)

    sampler.BuiltinSampler._generate_chunk = generate_chunk
    sampler.DynamicCache = lambda config=None, **kwargs: make_cache(length["max"], config)
