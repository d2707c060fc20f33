"""Load causal LMs and tokenizers by path or hub name (or `tiny`), add LoRA, save Hugging Face folders."""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from tether.config import LoraConfig  # declared with the configs (plain Python); re-exported here
from tether.models.tiny import tiny_model, tiny_tokenizer

TINY = "tiny"

# Hugging Face's per-file progress bars ("Loading weights", "Writing model shards") drown the run's own bar.
hf_logging.disable_progress_bar()


def parse_tiny(name: str) -> dict | None:
    """`tiny` → {}; `tiny:hidden_size=64,num_hidden_layers=2` → those overrides; anything else → None.
    `reasoning_tags=1` is the tokenizer's option (`tiny_tokenizer`), every other key a Llama config field."""
    if name == TINY:
        return {}
    if not name.startswith(TINY + ":"):
        return None
    overrides = {}
    for item in name[len(TINY) + 1:].split(","):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"model {name!r}: expected tiny:key=int,key=int (e.g. tiny:hidden_size=64), got {item!r}")
        overrides[key.strip()] = int(value)
    return overrides


def is_fsdp(model) -> bool:
    """True when `model` was sharded with FSDP2's `fully_shard` (its parameters are DTensor shards)."""
    return isinstance(model, FSDPModule)


def check_model_name(name: str) -> None:
    if not os.path.isdir(name) and (name.count("/") != 1 or name.startswith((".", "/"))):
        raise FileNotFoundError(f"model {name!r}: not a folder, not a hub name (owner/model), and not 'tiny'")


def load_tokenizer(name: str):
    """The tokenizer of `name` (`tiny`, a local folder or a hub name), with a pad token guaranteed."""
    tiny_overrides = parse_tiny(name)
    if tiny_overrides is not None:
        return tiny_tokenizer(reasoning_tags=bool(tiny_overrides.get("reasoning_tags", 0)))
    check_model_name(name)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load(name: str, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
         lora: LoraConfig | None = None, seed: int = 0):
    """Return `(model, tokenizer)` for a causal LM.

    `name` is `tiny` (the built-in model, freshly initialised with `seed`; `tiny:hidden_size=64,...` overrides
    its size), a local folder written by
    `save_pretrained` (a LoRA adapter folder is loaded onto its base model), or a hub name.
    """
    tokenizer = load_tokenizer(name)
    tiny_overrides = parse_tiny(name)
    if tiny_overrides is not None:
        tiny_overrides.pop("reasoning_tags", None)
        model = tiny_model(tokenizer, seed=seed, **tiny_overrides)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32)
    if dtype is not None:
        model = model.to(dtype)
    if lora is not None and lora.r > 0:
        model = add_lora(model, lora)
    if device is not None:
        model = model.to(device)
    return model, tokenizer


def add_lora(model: PreTrainedModel, lora: LoraConfig):
    """Wrap `model` with trainable LoRA adapters; the base weights are frozen."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    targets = lora.target_modules
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    return quiet_peft(get_peft_model, model, peft_config)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def quiet_peft(function, *args, **kwargs):
    """`function(*args, **kwargs)` (PEFT's `get_peft_model`) without the FutureWarning PEFT's own read of
    `model.is_gradient_checkpointing` raises under transformers >= 5.2x: PEFT's call, not tether's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return function(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """The KV cache as the model's forward takes it: `{"cache": cache}` in transformers versions that renamed it
    (5.25: `past_key_values` is deprecated), `{"past_key_values": cache}` in older ones."""
    inner = unwrap(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PEFT passes kwargs through
    return {_cache_keyword(type(inner)): cache}


def unwrap(model):
    """The model under DDP / FSDP / torch.compile wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


# What one more forward + backward of a micro-batch costs on CPU, in padded tokens, per transformer layer and per
# million parameters of the body (the Python and dispatch work of a call grows with the layers, a token's compute
# with the parameters). Measured on the tiny model (4 layers, 0.79M body parameters: ~60 tokens a call,
# docs/benchmarks.md). Not measured on CUDA, where a call costs kernel launches instead: no grouping there.
CALL_COST_TOKENS_PER_LAYER_MPARAM = 12.0


def forward_call_cost(model, device: torch.device | str) -> float:
    """One more forward + backward of `model`, in padded tokens (`data.batching.length_groups`); inf off CPU."""
    if torch.device(device).type != "cpu":
        return float("inf")
    inner = unwrap(model)
    embeddings = {id(p) for m in (inner.get_input_embeddings(), inner.get_output_embeddings()) if m is not None
                  for p in m.parameters()}
    body = sum(p.numel() for p in inner.parameters() if id(p) not in embeddings)
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    layers = getattr(config, "num_hidden_layers", None) or 1
    return CALL_COST_TOKENS_PER_LAYER_MPARAM * layers / max(body / 1e6, 1e-6)


def save(model, tokenizer, path: str | Path, *, merge_lora: bool = False) -> None:
    """Write a Hugging Face folder (safetensors). LoRA models save the adapter, or the merged model."""
    model = unwrap(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if merge_lora and is_peft(model):
        model = model.merge_and_unload()
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def load_adapter(base: str, adapter_dir: str | Path, *, merge: bool = False):
    """Load a LoRA adapter folder onto the base model `base`; optionally merge it into the weights."""
    from peft import PeftModel

    model, tokenizer = load(base)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    if merge:
        model = model.merge_and_unload()
    return model, tokenizer
