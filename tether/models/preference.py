"""Pairwise preference models: P(y ≻ y' | x) from one transformer that reads both answers.

A Bradley-Terry reward model scores each answer alone, so its preferences are transitive: it cannot say
rock ≻ scissors ≻ paper ≻ rock. A preference model reads the pair (Munos et al. 2024, §4). tether's is a
scalar-head model g (the same `AutoModelForSequenceClassification` folder as a reward model) on the sequence
`prompt + first + second` (each completion ends in EOS, which separates them), made antisymmetric:

    d(x, a, b) = g(x, a, b) − g(x, b, a)        P(a ≻ b | x) = σ(d(x, a, b))

so d(x, b, a) = −d(x, a, b) exactly (IEEE subtraction is antisymmetric) and P(a ≻ b) + P(b ≻ a) = 1: both
orders of every pair are seen in each forward. The folder also holds `preference_model.json`, which marks
it as a pairwise model (not a reward model) and records the sequence layout.

API
    load_preference_model(name_or_path, *, dtype=None, device=None, lora=None, seed=0) -> (model, tokenizer)
    save_preference_marker(folder)                       write preference_model.json into a saved folder
    is_preference_model_folder(path) -> bool
    collate_pair_orders(prompt_ids, first_ids, second_ids, pad_id) -> {input_ids, attention_mask} (2B, T)
        rows 0..B-1: prompt + first + second; rows B..2B-1: prompt + second + first; right-padded.
    preference_logits(model, input_ids, attention_mask) -> d (B,)      d = g(rows :B) − g(rows B:)
    PreferenceScorer(path_or_model, tokenizer=None, *, device="auto", batch_size=16, chat_template="auto")
        .probabilities(prompts, first, second) -> list[float]  P(first ≻ second | prompt), no grad, batched
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tether.config.preference_model import MARKER_FILE
from tether.models.device import choose_device, choose_dtype
from tether.models.value import is_scalar_head_folder, load_reward_model, sequence_rewards

LAYOUT = "prompt + first + second (each completion ends in EOS); d = g(first, second) - g(second, first)"


def is_preference_model_folder(path: str | Path) -> bool:
    return (Path(path) / MARKER_FILE).is_file() and is_scalar_head_folder(path)


def save_preference_marker(folder: str | Path) -> None:
    (Path(folder) / MARKER_FILE).write_text(json.dumps({"kind": "pairwise_preference", "layout": LAYOUT}) + "\n")


def load_preference_model(name_or_path: str, *, dtype: torch.dtype | None = None, device=None, lora=None,
                          seed: int = 0):
    """`(model, tokenizer)`: from `tiny` or a causal LM (new head, as a reward model starts) or a saved
    preference model folder. A reward model folder is refused: its head scores one answer, not a pair."""
    if is_scalar_head_folder(name_or_path) and not is_preference_model_folder(name_or_path):
        raise ValueError(f"{name_or_path} is a reward model folder (no {MARKER_FILE}); a preference model starts "
                         f"from `tiny`, a causal LM, or a folder written by `tether pm`")
    return load_reward_model(name_or_path, dtype=dtype, device=device, lora=lora, seed=seed)


def collate_pair_orders(prompt_ids: list[list[int]], first_ids: list[list[int]], second_ids: list[list[int]],
                        pad_id: int) -> dict[str, torch.Tensor]:
    """Both orders of B pairs for ONE forward: input_ids, attention_mask (2B, T), right-padded."""
    from tether.data.batching import pad

    sequences = ([p + a + b for p, a, b in zip(prompt_ids, first_ids, second_ids)]
                 + [p + b + a for p, a, b in zip(prompt_ids, first_ids, second_ids)])
    return {"input_ids": pad(sequences, pad_id), "attention_mask": pad([[1] * len(s) for s in sequences], 0)}


def preference_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """d(x, a, b) = g(x, a, b) − g(x, b, a) (B,) from the (2B, T) rows of `collate_pair_orders`."""
    scores = sequence_rewards(model, input_ids, attention_mask)  # (2B,)
    n = scores.shape[0] // 2
    return scores[:n] - scores[n:]  # (B,) antisymmetric by construction


class PreferenceScorer:
    """P(first ≻ second | prompt) with a preference model, batched, without gradients.

    Prompts and completions (strings or message lists) are tokenized as `tether pm` tokenized its pairs.
    """

    def __init__(self, path_or_model, tokenizer=None, *, device: str | torch.device = "auto", batch_size: int = 16,
                 chat_template: str = "auto", dtype: str = "auto"):
        self.device = choose_device(device) if isinstance(device, str) else device
        if isinstance(path_or_model, (str, Path)):
            if not is_preference_model_folder(path_or_model):
                raise ValueError(f"{path_or_model} is not a preference model folder (no {MARKER_FILE}); "
                                 f"train one with `tether pm`")
            model, tokenizer = load_preference_model(str(path_or_model), dtype=choose_dtype(dtype, self.device))
        elif tokenizer is None:
            raise ValueError("PreferenceScorer: pass the tokenizer with an already loaded model")
        else:
            model = path_or_model
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size, self.chat_template = batch_size, chat_template

    def encode(self, prompt, completion) -> tuple[list[int], list[int]]:
        from tether.data.sft import encode_prompt_completion

        return encode_prompt_completion(self.tokenizer, prompt, completion, chat_template=self.chat_template)

    @torch.no_grad()
    def logits_ids(self, prompt_ids: list[list[int]], first_ids: list[list[int]],
                   second_ids: list[list[int]]) -> torch.Tensor:
        """d(x, first, second) (N,) on CPU, float32."""
        out = []
        for start in range(0, len(prompt_ids), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            batch = collate_pair_orders(prompt_ids[chunk], first_ids[chunk], second_ids[chunk],
                                        self.tokenizer.pad_token_id)
            out.append(preference_logits(self.model, batch["input_ids"].to(self.device),
                                         batch["attention_mask"].to(self.device)).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def logits(self, prompts: list, first: list, second: list) -> torch.Tensor:
        if not len(prompts) == len(first) == len(second):
            raise ValueError(f"preference: {len(prompts)} prompts, {len(first)} first and {len(second)} second "
                             f"completions; expected as many of each")
        encoded_first = [self.encode(p, a) for p, a in zip(prompts, first)]
        second_ids = [self.encode(p, b)[1] for p, b in zip(prompts, second)]
        return self.logits_ids([e[0] for e in encoded_first], [e[1] for e in encoded_first], second_ids)

    def probabilities(self, prompts: list, first: list, second: list) -> list[float]:
        return torch.sigmoid(self.logits(prompts, first, second)).tolist()
