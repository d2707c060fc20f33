"""vLLM behind the `Sampler` interface (`engine="vllm"`): faster sampling on CUDA for large models.

UNTESTED HERE: this machine has no CUDA and no vLLM, so this file is written against vLLM's public
`LLM.generate` / `SamplingParams` API (0.10.2 or newer, for `logprobs_mode`) and has never run. The built-in
engine is the reference; see docs/generation.md for how the two differ.

vLLM is imported only when a VLLMSampler is made, so `import tether.rollout` never needs it.
"""

from __future__ import annotations

from tether.rollout.engine import RolloutBatch, Sampler, default_eos_ids, encode_prompts
from tether.rollout.params import SamplingParams

VLLM_MISSING = "rollout.engine=vllm needs vLLM: pip install 'tether[vllm]' (CUDA only)"


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(VLLM_MISSING) from err
    return vllm


class VLLMSampler(Sampler):
    """Samples with a colocated `vllm.LLM` loaded from the policy's folder; `load_weights` syncs a trained policy.

    `model` is the training model (its `name_or_path` must be a folder or hub name vLLM can load; save the
    built-in tiny model first) or that path itself. Extra keyword arguments go to `vllm.LLM`.
    """

    def __init__(self, model, tokenizer, *, gpu_memory_utilization: float = 0.5, dtype: str = "auto",
                 max_model_len: int | None = None, batch_size: int | None = None, **llm_kwargs):
        vllm = _import_vllm()
        path = model if isinstance(model, str) else getattr(model, "name_or_path", "")
        if not path:
            raise ValueError("rollout.engine=vllm loads the model from a folder or hub name, and this model has "
                             "none: save it with tether.models.save(model, tokenizer, folder) and load from there")
        self.tokenizer = tokenizer
        self.eos_ids = default_eos_ids(None if isinstance(model, str) else model, tokenizer)
        self._vllm = vllm
        # processed_logprobs: log-probs after temperature (and filters), i.e. what was sampled from;
        # the default (raw_logprobs) would be temperature 1.
        self.llm = vllm.LLM(model=path, tokenizer=getattr(tokenizer, "name_or_path", None) or path, dtype=dtype,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            logprobs_mode="processed_logprobs", **llm_kwargs)
        # batch_size is accepted for interface parity; vLLM schedules its own batches.

    def _vllm_params(self, params: SamplingParams, seed: int | None):
        return self._vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,  # -1 is "off" in every vLLM version
            min_p=params.min_p,
            max_tokens=params.max_new_tokens,
            min_tokens=params.min_new_tokens,
            stop=list(params.stop) or None,
            stop_token_ids=self.eos_ids or None,
            ignore_eos=params.ignore_eos,
            include_stop_str_in_output=params.include_stop_str_in_output,
            seed=seed,
            logprobs=0,  # only the sampled token's log-prob
        )

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams) -> RolloutBatch:
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        # One seed per prompt: requests seeded alike would draw the same noise.
        request_params = [self._vllm_params(params, None if params.seed is None else params.seed + i)
                          for i in range(len(prompt_ids))]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], request_params,
                                    use_tqdm=False)
        completion_ids, logprobs, reasons, texts = [], [], [], []
        for request in outputs:
            for sample in sorted(request.outputs, key=lambda o: o.index):
                ids = list(sample.token_ids)
                completion_ids.append(ids)
                logprobs.append([position[token].logprob for token, position in zip(ids, sample.logprobs or [])])
                reasons.append(_finish_reason(sample))
                texts.append(sample.text)
        return RolloutBatch(prompt_ids=prompt_ids, completion_ids=completion_ids, completion_logprobs=logprobs,
                            finish_reasons=reasons, completions=texts,
                            prompt_index=[i for i in range(len(prompt_ids)) for _ in range(params.n)])

    def load_weights(self, model) -> None:
        """Copy `model`'s current weights into the vLLM engine (LoRA adapters merged). UNTESTED HERE.

        Uses the in-process engine's model (`vllm.LLM(...)` with a single GPU worker in this process).
        """
        from tether.models import is_peft, unwrap

        model = unwrap(model)
        if is_peft(model):
            model.merge_adapter()
            try:
                state = {_peft_to_base_name(k): v for k, v in model.state_dict().items() if "lora_" not in k}
            finally:
                model.unmerge_adapter()
        else:
            state = model.state_dict()
        self._engine_model().load_weights(state.items())
        if hasattr(self.llm, "reset_prefix_cache"):  # cached prompt KV came from the old weights
            self.llm.reset_prefix_cache()

    def _engine_model(self):
        worker = self.llm.llm_engine.model_executor.driver_worker
        runner = getattr(worker, "model_runner", None) or worker.worker.model_runner  # V0 / V1 layouts
        return runner.model


def _finish_reason(sample) -> str:
    """vLLM's (finish_reason, stop_reason) as tether's "eos" / "stop" / "length"."""
    if sample.finish_reason == "length":
        return "length"
    if isinstance(getattr(sample, "stop_reason", None), str):
        return "stop"  # a stop string
    return "eos"  # EOS, or one of the EOS ids passed as stop_token_ids


def _peft_to_base_name(name: str) -> str:
    """`base_model.model.model.layers.0.q_proj.base_layer.weight` -> `model.layers.0.q_proj.weight`."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")
