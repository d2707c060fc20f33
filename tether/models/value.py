"""Scalar-head models: reward models, value models (PPO critics) and a value head on a policy's body.

Every scalar-head model tether writes is a Hugging Face `AutoModelForSequenceClassification` folder with
one label (`num_labels=1`, `pad_token_id` set): a transformer body plus a bias-free linear `score` head.
A reward model reads the head at the last non-padding token; a value model reads it at every token.
So a reward model folder is also a valid critic initialisation (InstructGPT initialises the critic
from the reward model), and `from_pretrained` loads either with transformers alone.

API
    load_reward_model(name_or_path, *, dtype=None, device=None, lora=None, seed=0) -> (model, tokenizer)
        `tiny`, a causal LM folder / hub name (body copied, new head) or a reward model folder (head kept).
    sequence_rewards(model, input_ids, attention_mask) -> (B,)
        The scalar at each sequence's last non-padding token (right padding).
    RewardScorer(path_or_model, tokenizer=None, *, device="auto", batch_size=16, chat_template="auto")
        .score(prompts, completions) -> list[float]       batched, no grad; strings or message lists.

    ValueModel(model)                                      an nn.Module around a scalar-head model
        .forward(input_ids, attention_mask, position_ids=None) -> values (B, T) float32
            values[:, t] = V(state after token t); left or right padding; pad positions are meaningless.
        .save_pretrained(path, tokenizer=None)              the same folder format as a reward model
    load_value_model(name_or_path, *, dtype=None, device=None, lora=None, seed=0) -> (ValueModel, tokenizer)
        From `tiny`, a causal LM (fresh head) or a reward model folder (its head).

    ValueHead(hidden_size)                                 the "shared body" option: a head on the policy
        .forward(hidden_states (B, T, H)) -> (B, T) float32; .save(folder) / ValueHead.load(folder)
    forward_with_values(policy, head, input_ids, attention_mask) -> (logits (B, T, V), values (B, T))
        One forward of a causal LM giving both its logits and the head's values on its last hidden states.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from tether.models import LoraConfig, check_model_name, is_peft, load_tokenizer, parse_tiny, quiet_peft, unwrap
from tether.models.device import choose_device, choose_dtype
from tether.ops import position_ids_from_mask

VALUE_HEAD_FILE = "value_head.safetensors"


# ----------------------------------------------------------------------------- loading


def _hf_model(model) -> PreTrainedModel:
    """The transformers model under DDP / compile / PEFT wrappers (LoRA layers stay active)."""
    model = unwrap(model)
    return model.get_base_model() if is_peft(model) else model


def score_head(model) -> nn.Module:
    """The linear head of a sequence-classification model (`score` on decoder models)."""
    inner = _hf_model(model)
    for name in ("score", "classifier"):
        head = getattr(inner, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(inner).__name__} has no 'score' head; expected an AutoModelForSequenceClassification")


def is_scalar_head_folder(path: str | Path) -> bool:
    """True when `path` holds a sequence-classification model (a reward or value model)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def from_causal_lm(causal_lm: PreTrainedModel, *, pad_token_id: int | None = None, seed: int = 0) -> PreTrainedModel:
    """A one-label sequence-classification model with `causal_lm`'s body weights and a fresh `score` head."""
    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    config.architectures = None
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config)
    model.base_model.load_state_dict(causal_lm.base_model.state_dict())
    return model.to(causal_lm.dtype)


def _add_lora(model: PreTrainedModel, lora: LoraConfig):
    """LoRA on the body; the `score` head is trained in full (PEFT's SEQ_CLS task saves it)."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    targets = lora.target_modules
    peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="SEQ_CLS",
                                 target_modules="all-linear" if targets == ["all-linear"] else targets)
    return quiet_peft(get_peft_model, model, peft_config)


def load_reward_model(name_or_path: str, *, dtype: torch.dtype | None = None, device=None,
                      lora: LoraConfig | None = None, seed: int = 0):
    """`(model, tokenizer)`: a one-label `AutoModelForSequenceClassification` with `pad_token_id` set.

    `tiny` (or `tiny:hidden_size=64,...`) builds the built-in model (seeded); a causal LM folder or hub name
    gets its body loaded and a new head (initialised under `seed`); a reward/value model folder is loaded whole.
    """
    tokenizer = load_tokenizer(name_or_path)
    tiny_overrides = parse_tiny(name_or_path)
    if tiny_overrides is not None:
        from tether.models.tiny import tiny_model

        causal_lm = tiny_model(tokenizer, seed=seed, **tiny_overrides)
        model = from_causal_lm(causal_lm, pad_token_id=tokenizer.pad_token_id, seed=seed)
    else:
        check_model_name(name_or_path)
        config = AutoConfig.from_pretrained(name_or_path)
        config.num_labels = 1
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path, config=config,
                                                                       dtype=dtype or torch.float32)
    if dtype is not None:
        model = model.to(dtype)
    if lora is not None and lora.r > 0:
        model = _add_lora(model, lora)
    if device is not None:
        model = model.to(device)
    return model, tokenizer


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward per sequence (B,), read at the last non-padding token (Hugging Face's pooling)."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()  # (B,)


# ----------------------------------------------------------------------------- scoring


class RewardScorer:
    """Score (prompt, completion) pairs with a reward model, in batches, without gradients.

    `path_or_model` is a reward model folder (or a loaded model, with `tokenizer`). Prompts and completions
    are strings or message lists, tokenized exactly as the `rm` recipe tokenized its training pairs.
    Sequences longer than `max_length` keep their last `max_length` tokens (the scored end).
    """

    def __init__(self, path_or_model, tokenizer=None, *, device: str | torch.device = "auto", batch_size: int = 16,
                 chat_template: str = "auto", max_length: int | None = None, dtype: str = "auto"):
        self.device = choose_device(device) if isinstance(device, str) else device
        if isinstance(path_or_model, (str, Path)):
            model, tokenizer = load_reward_model(str(path_or_model), dtype=choose_dtype(dtype, self.device))
        elif tokenizer is None:
            raise ValueError("RewardScorer: pass the tokenizer with an already loaded model")
        else:
            model = path_or_model
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size, self.chat_template, self.max_length = batch_size, chat_template, max_length

    def encode(self, prompt, completion) -> list[int]:
        from tether.data.sft import encode_prompt_completion

        prompt_ids, completion_ids = encode_prompt_completion(self.tokenizer, prompt, completion,
                                                              chat_template=self.chat_template)
        ids = prompt_ids + completion_ids
        return ids[-self.max_length:] if self.max_length else ids

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """Rewards of token-id sequences, batched by length (less padding), returned in input order."""
        from tether.data.batching import pad

        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        scores = [0.0] * len(sequences)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start: start + self.batch_size]
            input_ids = pad([sequences[i] for i in chunk], self.tokenizer.pad_token_id).to(self.device)  # (b, T)
            attention_mask = pad([[1] * len(sequences[i]) for i in chunk], 0).to(self.device)
            rewards = sequence_rewards(self.model, input_ids, attention_mask)  # (b,)
            for i, reward in zip(chunk, rewards.tolist()):
                scores[i] = reward
        return scores

    def score(self, prompts: list, completions: list) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
        return self.score_ids([self.encode(p, c) for p, c in zip(prompts, completions)])


# ----------------------------------------------------------------------------- value model (PPO critic)


class ValueModel(nn.Module):
    """Per-token values from a scalar-head model: V[:, t] = score(hidden_state[:, t]).

    Wraps an `AutoModelForSequenceClassification` (optionally with LoRA), so it saves, loads and shards
    like any transformers model; wrap it in DDP/FSDP as a whole.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return _hf_model(self.model).config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask (B, T) -> values (B, T) float32."""
        inner = _hf_model(self.model)
        if position_ids is None and bool((attention_mask[:, 0] == 0).any()):  # left padding
            position_ids = position_ids_from_mask(attention_mask)
        hidden = inner.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids).last_hidden_state  # (B, T, H)
        return score_head(inner)(hidden).squeeze(-1).float()  # (B, T)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        _hf_model(self.model).gradient_checkpointing_enable(**kwargs)

    def save_pretrained(self, path: str | Path, tokenizer=None, *, merge_lora: bool = True) -> None:
        from tether.models import save

        save(self.model, tokenizer, path, merge_lora=merge_lora)


def load_value_model(name_or_path: str, *, dtype: torch.dtype | None = None, device=None,
                     lora: LoraConfig | None = None, seed: int = 0):
    """`(ValueModel, tokenizer)` from `tiny`, a causal LM (fresh head) or a reward/value model folder."""
    model, tokenizer = load_reward_model(name_or_path, dtype=dtype, device=device, lora=lora, seed=seed)
    return ValueModel(model), tokenizer


# ----------------------------------------------------------------------------- shared body


class ValueHead(nn.Module):
    """A bias-free linear map hidden state → value, for a critic that shares the policy's body.

    Its weight has the shape of a reward model's `score.weight` (1, H), so `head.linear.weight` can be
    copied from one. Computed in float32 whatever the body's dtype.
    """

    def __init__(self, hidden_size: int, *, init_std: float | None = None):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, bias=False, dtype=torch.float32)
        nn.init.normal_(self.linear.weight, std=init_std if init_std is not None else 1 / (hidden_size + 1))

    @classmethod
    def for_model(cls, model, **kwargs) -> "ValueHead":
        config = _hf_model(model).config
        return cls(config.get_text_config().hidden_size, **kwargs)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, T)."""
        return self.linear(hidden_states.float()).squeeze(-1)

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.linear.weight.detach().cpu().contiguous()}, str(folder / VALUE_HEAD_FILE))
        return folder / VALUE_HEAD_FILE

    @classmethod
    def load(cls, folder: str | Path) -> "ValueHead":
        from safetensors.torch import load_file

        weight = load_file(str(Path(folder) / VALUE_HEAD_FILE))["weight"]  # (1, H)
        head = cls(weight.shape[1])
        head.linear.weight.data.copy_(weight)
        return head


def forward_with_values(policy, head: ValueHead, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """One forward of a causal LM: (logits (B, T, V), values (B, T)) from its last hidden states."""
    kwargs = {}
    if bool((attention_mask[:, 0] == 0).any()):  # left padding: positions must start at 0
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    out = policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs)
    return out.logits, head(out.hidden_states[-1])  # hidden_states[-1]: after the final norm, (B, T, H)
