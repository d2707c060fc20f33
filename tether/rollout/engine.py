"""The engine interface every sampler implements, and what it returns.

    engine.generate(prompts: list[list[int]] | list[str], params: SamplingParams) -> RolloutBatch
    engine.load_weights(model)          # sample from the policy's current weights after an optimizer step

Engines (`sampler.BuiltinSampler`, `vllm_engine.VLLMSampler`) import this module, never each other;
`tether.rollout.factory.get_sampler` picks one by name.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from tether.data.batching import collate_prompt_completion
from tether.rollout.params import SamplingParams


FINISH_REASONS = ("stop", "eos", "length")


@dataclass
class RolloutBatch:
    """Completions for a list of prompts; sample rows are grouped prompt by prompt.

    With P prompts and n samples each there are N = P * n samples; rows [i*n:(i+1)*n] belong to prompt i.
    """

    prompt_ids: list[list[int]]
    """Token ids of each prompt (P lists, no padding)."""
    completion_ids: list[list[int]]
    """Sampled token ids of each sample (N lists), including a final EOS or stop-completing token."""
    completion_logprobs: list[list[float]]
    """log pi(token) at the sampling temperature, full distribution; aligned with completion_ids."""
    finish_reasons: list[str]
    """Per sample: "eos", "stop" (a stop string) or "length" (max_new_tokens reached)."""
    completions: list[str]
    """Decoded completion text per sample: special tokens skipped, cut before a matched stop string."""
    prompt_index: list[int]
    """Per sample, the index of its prompt."""

    @property
    def n(self) -> int:
        """Samples per prompt."""
        return len(self.completion_ids) // max(len(self.prompt_ids), 1)

    @property
    def sample_index(self) -> list[int]:
        """Per sample, its index among the samples of its prompt (0..n-1)."""
        return [row % self.n for row in range(len(self.completion_ids))]

    def to_tensors(self, pad_id: int, device: torch.device | str | None = None) -> dict:
        """Padded tensors for a teacher-forced forward over prompt + completion.

        Returns a dict with
          input_ids          (N, P+C) long: prompt LEFT-padded to P, completion RIGHT-padded to C
          attention_mask     (N, P+C) long: 1 on real prompt and completion tokens
          completion_mask    (N, C)   float: 1 on sampled tokens
          sampling_logprobs  (N, C)   float32: 0 on padding
          prompt_index       (N,)     long
          prompt_length      int P
        so `models.forward.model_token_logprobs(model, input_ids, attention_mask)[0][:, P - 1:]` is (N, C) and lines up
        with `completion_mask` and `sampling_logprobs`.
        """
        tensors = collate_prompt_completion(self.prompt_ids, self.completion_ids, self.prompt_index, pad_id)
        P = tensors.pop("prompt_length")
        sampling_logprobs = torch.zeros(tensors["completion_mask"].shape, dtype=torch.float32)  # (N, C)
        for row, logprobs in enumerate(self.completion_logprobs):
            sampling_logprobs[row, :len(logprobs)] = torch.tensor(logprobs, dtype=torch.float32)
        tensors["sampling_logprobs"] = sampling_logprobs
        if device is not None:
            tensors = {k: v.to(device) for k, v in tensors.items()}
        tensors["prompt_length"] = P
        return tensors


class Sampler(abc.ABC):
    """What every engine provides. Prompts are strings (tokenized here) or token id lists (used as given)."""

    @abc.abstractmethod
    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams) -> RolloutBatch:
        ...

    def load_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights (after an optimizer step)."""


def default_eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a sample: the tokenizer's EOS and the model's generation_config EOS ids."""
    ids = set()
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else source)
    return sorted(ids)


def encode_prompts(tokenizer, prompts: list[str] | list[list[int]]) -> list[list[int]]:
    """Token ids of each prompt. Strings get the tokenizer's special tokens (e.g. BOS) unless they already
    start with the BOS text (a chat template that writes it), so BOS is never doubled."""
    encoded = []
    for prompt in prompts:
        if isinstance(prompt, str):
            bos = getattr(tokenizer, "bos_token", None)
            add_special = not (bos and prompt.startswith(bos))
            encoded.append(tokenizer(prompt, add_special_tokens=add_special)["input_ids"])
        else:
            encoded.append([int(t) for t in prompt])
        if not encoded[-1]:
            raise ValueError(f"prompt {len(encoded) - 1} is empty: nothing to condition on")
    return encoded
