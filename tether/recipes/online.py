"""Online RL pieces shared by the GRPO and PPO recipes, written once.

    prompts ──sample G each──► completions ──reward functions──► rewards ──► advantages ──► update

This module holds what both loops need around the maths: the shared config keys (`OnlineConfig`), RL
prompt loading and validation, a prompt stream that resumes from a cursor, schedules, the rollout → score
step (with DAPO's dynamic sampling), the frozen reference, the one forward that scores completions
(log-probs, entropy, values), minibatch order, metrics, `samples.jsonl` and the time split.
The formulas live in `tether.losses` and `tether.advantages`; the loops in `grpo.py` and `ppo.py`.

Tensor names: N completions in a step (B prompts × G samples, group by group), C completion tokens
(right-padded), P prompt tokens (left-padded). Every per-token tensor of a rollout is (N, C) and lines
up with `completion_mask`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

import tether.models.reference
from tether.config import ConfigError, TrainConfig
from tether.data.batching import BatchOrder
from tether.data.chat import prompt_text, validate_messages
from tether.data.loading import DataError, load_rows
from tether.envs import BUILTIN_ENVS, FORMATS, get_env
from tether.losses import AdaptiveKLController, FixedKLController, kl_estimate
from tether.models import unwrap
from tether.models.shared_prompt import completion_logprobs, shares_prompts
from tether.ops import entropy_from_logits, model_token_logprobs, position_ids_from_mask, token_logprobs
from tether.rewards import RewardResult, available_rewards, get_reward
from tether.rollout import RolloutBatch, SamplingParams, get_sampler
from tether.rollout.episodes import EpisodeBatch, concat_batches, generate_episodes, select_rows
from tether.runtime import distributed
from tether.runtime.logger import trim_step_lines
from tether.runtime.metrics import MetricMeans

log = logging.getLogger("tether")


# ----------------------------------------------------------------------------- config


@dataclass
class OnlineConfig(TrainConfig):
    """Keys shared by the online RL recipes (grpo, ppo)."""

    max_steps: int = -1
    """Steps to run (one rollout each, then ppo_epochs × num_minibatches optimizer steps); -1 means `epochs`
    passes over the prompts."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimizer steps (ppo_epochs × num_minibatches per step)."""
    batch_size: int = 8
    """Prompts per step; each is sampled group_size times, so a step trains on batch_size × group_size
    completions."""
    micro_batch_size: int = 0
    """Completions per forward/backward (and per no-grad scoring forward); 0 means a whole minibatch."""
    overlong: Literal["error", "truncate", "drop"] = "error"
    """Prompts longer than max_prompt_length: error, truncate (keep the LAST max_prompt_length tokens) or
    drop. Truncated and dropped prompts are counted in the log; none reaches the sampler."""
    rewards: list[dict] = field(default_factory=list)
    """Reward functions and weights, e.g. [{name: math, weight: 1.0}, {name: format, weight: 0.5}]: a
    built-in name or path/to/file.py:function, a weight (default 1), and that reward's own options."""
    group_size: int = 8
    """G: completions sampled per prompt."""
    group_size_end: int | None = None
    """If set, G moves linearly from group_size to this value over schedule_steps (rounded)."""
    max_prompt_length: int = 256
    """Longest prompt in tokens (see `overlong`)."""
    max_completion_length: int = 128
    """Most tokens generated per completion; a completion that reaches it is truncated."""
    min_completion_length: int = 0
    """Fewest tokens generated per completion: EOS cannot end one earlier (vLLM's min_tokens, HF's
    min_new_tokens). The log-probs stay those of the full distribution, EOS included. Equal to
    max_completion_length, every completion has that length (fixed-length rollouts, as in benchmarks)."""
    temperature: float = 1.0
    """Sampling temperature; the training log-probs use the same temperature (logits / T)."""
    temperature_end: float | None = None
    """If set, the temperature moves linearly from `temperature` to this value over schedule_steps."""
    schedule_steps: int = 0
    """Length of the temperature and group-size schedules in steps; 0 means all steps."""
    top_p: float = 1.0
    """Nucleus sampling (1 = off). Log-probs are always of the full distribution."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    min_p: float = 0.0
    """Min-p sampling (0 = off)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a completion (besides EOS)."""
    rollout_engine: Literal["builtin", "vllm"] = "builtin"
    """Sampler: the built-in KV-cache engine, or vLLM (CUDA, when installed)."""
    generation_batch_size: int = 0
    """Prompts per sampler call (memory bound for generation); 0 means all of a rank's prompts of a step at once.
    Each call is seeded by its prompts' position in the step, so a value dividing batch_size / ranks samples
    the same completions on any number of ranks."""
    chat_template: Literal["auto", "always", "never"] = "auto"
    """auto: message-list prompts use the tokenizer's chat template, strings are used as is;
    always: string prompts are wrapped as a user message too; never: no template."""
    kl_coef: float = 0.04
    """β, weight of the KL to the frozen reference. 0 loads no reference and runs no reference forward."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token estimator of KL(π_θ‖π_ref) (Schulman 2020): k1 = log r, k2 = (log r)²/2, k3 = r − 1 − log r."""
    kl_controller: Literal["fixed", "adaptive_simple", "adaptive_proportional"] = "fixed"
    """fixed β; adaptive_proportional (Ziegler et al. 2019) or adaptive_simple (doubling/halving) steer
    β toward kl_target."""
    kl_target: float = 6.0
    """Target KL of a completion (nats, summed over its tokens) for the adaptive controllers."""
    kl_horizon: int = 10000
    """Horizon of adaptive_proportional: β moves by at most ±20% per horizon completions."""
    ppo_epochs: int = 1
    """μ: update epochs over each step's rollouts."""
    num_minibatches: int = 1
    """Optimizer steps per epoch: the rollouts are shuffled and split into this many minibatches."""
    clip_low: float = 0.2
    """ε_low: the ratio is clipped below at 1 − ε_low."""
    clip_high: float = 0.2
    """ε_high: the ratio is clipped above at 1 + ε_high (DAPO clip-higher: 0.28)."""
    dual_clip: float | None = None
    """Dual clip c > 1: for negative advantages the loss is also capped at −c·A (Ye et al. 2020); null = off."""
    importance_level: Literal["token", "sequence"] = "token"
    """Importance ratio per token (PPO/GRPO) or one per sequence, the geometric mean (GSPO)."""
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "token_sum_norm"] = "token_mean"
    """Loss reduction: token_mean (DAPO), seq_mean_token_mean (GRPO paper), token_sum_norm
    (Dr. GRPO: sum / (completions × max_completion_length))."""
    old_logprobs: Literal["auto", "sampler", "recompute"] = "auto"
    """π_old log-probs: sampler = the sampler's own log-probs (no forward); recompute = a no-grad forward;
    auto = sampler when on-policy (ppo_epochs=1, num_minibatches=1, builtin engine), else recompute."""
    mask_truncated: bool = False
    """DAPO overlong filtering: completions cut at max_completion_length carry no loss."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (loss −= coef × entropy)."""
    sample_steps: int = 10
    """Write every completion of every N-th step to samples.jsonl (0: never)."""
    eval_steps: int = 0
    """Mean reward on eval_data every N steps (one sample per prompt at eval_temperature); 0: only at the end."""
    eval_temperature: float = 0.0
    """Sampling temperature of the evaluation (0 = greedy)."""
    env: str = ""
    """Multi-turn episodes instead of single completions: calculator | python | calculator+python | single_turn |
    path/to/file.py:Class (docs/tools.md). Observation tokens are context, never trained on."""
    env_options: dict = field(default_factory=dict)
    """Options of the environment: format (tag | json tool calls), the python tool's timeout, memory_mb, ...; a
    user's class gets them as keyword arguments."""
    max_turns: int = 4
    """Most model turns per episode (with `env`)."""
    max_turn_tokens: int = 0
    """Most tokens per model turn (with `env`); 0: only the episode's max_completion_length (model and
    observation tokens together) bounds it."""

    def validate(self) -> None:
        checks = [
            ("group_size", self.group_size >= 1, "must be >= 1"),
            ("group_size_end", self.group_size_end is None or self.group_size_end >= 1, "must be >= 1"),
            ("max_prompt_length", self.max_prompt_length >= 1, "must be >= 1"),
            ("max_completion_length", self.max_completion_length >= 1, "must be >= 1"),
            ("min_completion_length", 0 <= self.min_completion_length <= self.max_completion_length,
             f"must be in [0, max_completion_length] ([0, {self.max_completion_length}])"),
            ("max_length", self.max_prompt_length + self.max_completion_length <= self.max_length,
             f"must be >= max_prompt_length + max_completion_length "
             f"({self.max_prompt_length} + {self.max_completion_length})"),
            ("temperature", self.temperature > 0, "must be > 0 for RL (log-probs are taken at it)"),
            ("temperature_end", self.temperature_end is None or self.temperature_end > 0, "must be > 0"),
            ("kl_coef", self.kl_coef >= 0, "must be >= 0"),
            ("kl_coef", self.kl_controller == "fixed" or self.kl_coef > 0,
             "an adaptive kl_controller scales beta multiplicatively: start it > 0"),
            ("kl_target", self.kl_target > 0, "must be > 0"),
            ("kl_horizon", self.kl_horizon > 0, "must be > 0"),
            ("ppo_epochs", self.ppo_epochs >= 1, "must be >= 1"),
            ("num_minibatches", self.num_minibatches >= 1, "must be >= 1"),
            ("num_minibatches", self.num_minibatches <= self.batch_size * min(self.group_size,
                                                                             self.group_size_end or self.group_size),
             "must be <= the completions per step (batch_size × group_size)"),
            ("clip_low", 0 <= self.clip_low < 1, "must be in [0, 1)"),
            ("clip_high", self.clip_high >= 0, "must be >= 0"),
            ("dual_clip", self.dual_clip is None or self.dual_clip > 1, "must be > 1 (or null)"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("entropy_coef", self.entropy_coef >= 0, "must be >= 0"),
            ("max_turns", self.max_turns >= 1, "must be >= 1"),
            ("max_turn_tokens", self.max_turn_tokens >= 0, "must be >= 0 (0: no per-turn bound)"),
        ]
        for key, ok, message in checks:
            if not ok:
                raise ConfigError(f"config key '{key}': {message}, got {getattr(self, key)!r}")
        for index, spec in enumerate(self.rewards):
            name = spec.get("name")
            if not isinstance(name, str) or not name:
                raise ConfigError(f"config key 'rewards[{index}]': each reward needs a name, e.g. "
                                  f"{{name: math, weight: 1.0}}; got {spec!r}")
            if name not in available_rewards():  # built-ins are built (and their options checked) at train start
                try:  # an unknown name raises the registry's message; a user's file:function is imported
                    get_reward(name)
                except ValueError as err:
                    raise ConfigError(f"config key 'rewards[{index}]': {err}") from None

        if self.env_options.get("format", "tag") not in FORMATS:
            raise ConfigError(f"config key 'env_options.format': must be one of {', '.join(FORMATS)}, got "
                              f"{self.env_options['format']!r}")
        if self.env and ":" not in self.env and self.env not in BUILTIN_ENVS:
            raise ConfigError(f"config key 'env': {self.env!r} is unknown; use one of {', '.join(BUILTIN_ENVS)} "
                              "or path/to/file.py:Class")
        if self.env and self.env not in BUILTIN_ENVS:
            try:  # a user's file:Class is imported now, so a typo fails before any work
                get_env(self.env, **self.env_options)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"config key 'env': {err}") from None

    def episodes(self) -> "EpisodeOptions | None":
        """How to roll out episodes, or None for single completions."""
        if not self.env:
            return None
        return EpisodeOptions(get_env(self.env, **self.env_options), self.max_turns, self.max_turn_tokens)

    def kl_needed(self) -> bool:
        """Whether any step can use the reference: β > 0 (an adaptive β starts > 0 and stays > 0)."""
        return self.kl_coef > 0


def linear_schedule(start: float, end: float | None, step: int, steps: int) -> float:
    """start → end linearly over `steps` steps, then end; `end=None` means constant."""
    if end is None or steps <= 0:
        return start
    return start + (end - start) * min(step / steps, 1.0)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. (seed, step, attempt, position)): a resumed step samples the same."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_kl_controller(config: OnlineConfig):
    if config.kl_controller == "fixed":
        return FixedKLController(config.kl_coef)
    mode = config.kl_controller.removeprefix("adaptive_")
    return AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon, mode=mode)


# ----------------------------------------------------------------------------- prompts


@dataclass
class Prompt:
    """One RL prompt: the row's prompt as given (handed to reward functions), its token ids (what the
    sampler continues) and every other column of the row (handed to reward functions too)."""

    prompt: str | list
    ids: list[int]
    columns: dict
    row: int


def load_prompts(source: str, tokenizer, *, split: str = "train", max_prompt_length: int,
                 overlong: str = "error", chat_template: str = "auto") -> list[Prompt]:
    """Validate and tokenize `{prompt, ...}` rows. Overlong prompts follow `overlong`, counted in the log."""
    rows = load_rows(source, split)
    column_names = sorted({key for row in rows for key in row if key != "prompt"})
    prompts, truncated, dropped = [], 0, []
    for index, row in enumerate(rows):
        if "prompt" not in row:
            raise DataError(source, f"missing field; RL rows need 'prompt' (got fields {sorted(row)})", index,
                            "prompt")
        prompt = row["prompt"]
        if isinstance(prompt, list):
            validate_messages(prompt, source, index, "prompt", end_with_assistant=False)
            if chat_template == "never":
                raise DataError(source, "the prompt is a message list but chat_template=never; give it as a string "
                                        "or use chat_template=auto", index, "prompt")
        elif not isinstance(prompt, str) or not prompt.strip():
            raise DataError(source, f"expected a non-empty string or a message list, got {prompt!r:.60}", index,
                            "prompt")
        text = prompt_text(tokenizer, prompt, chat_template=chat_template)
        templated = isinstance(prompt, list) or text is not prompt
        ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
        if len(ids) > max_prompt_length:
            if overlong == "error":
                raise DataError(source, f"prompt has {len(ids)} tokens > max_prompt_length={max_prompt_length}; "
                                        "raise max_prompt_length or set overlong=drop or overlong=truncate", index,
                                "prompt")
            if overlong == "drop":
                dropped.append(index)
                continue
            ids, truncated = ids[-max_prompt_length:], truncated + 1
        columns = {key: row.get(key) for key in column_names}
        prompts.append(Prompt(prompt, ids, columns, index))
    if truncated or dropped:
        log.warning("%s: %d prompts, %d truncated to their last %d tokens, %d dropped as longer than "
                    "max_prompt_length%s", source, len(rows), truncated, max_prompt_length, len(dropped),
                    f" (rows {dropped[:10]}{'...' if len(dropped) > 10 else ''})" if dropped else "")
    if not prompts:
        raise DataError(source, f"every prompt was dropped as longer than max_prompt_length={max_prompt_length}")
    return prompts


class PromptStream:
    """An endless, seeded order over the prompts (a fresh permutation per epoch), read from a cursor.

    Dynamic sampling may take more prompts in one step than another, so the position is the cursor, saved
    in checkpoints, not the step number."""

    def __init__(self, n: int, seed: int):
        self.order = BatchOrder(n, 1, seed)
        self.cursor = 0

    def take(self, k: int) -> list[int]:
        indices = [self.order.batch(self.cursor + i)[0] for i in range(k)]
        self.cursor += k
        return indices


# ----------------------------------------------------------------------------- rollout → score


@dataclass
class Rollout:
    """One step's completions, group by group: rows [g*G:(g+1)*G] are the G completions of prompts[g]."""

    prompts: list[Prompt]
    """(B,) one per group."""
    samples: RolloutBatch
    """N = B × G completions: ids, sampling log-probs, finish reasons, text."""
    scores: RewardResult
    """Each reward function's values and the weighted total, per completion."""
    group_size: int
    """G, completions per prompt (kept here: a rollout of zero groups has no samples to count)."""

    @property
    def rewards(self) -> Tensor:
        """(N,) weighted total reward; NaN where a reward function could not judge (None)."""
        return torch.tensor([math.nan if r is None else r for r in self.scores.total], dtype=torch.float32)

    @property
    def truncated(self) -> Tensor:
        """(N,) True where the completion was cut at max_completion_length."""
        return torch.tensor([r == "length" for r in self.samples.finish_reasons])

    def select(self, groups: list[int]) -> "Rollout":
        """The rollout restricted to the given groups (prompt positions), in that order."""
        G = self.group_size
        rows = [g * G + j for g in groups for j in range(G)]
        r = self.scores
        samples = select_rows(self.samples, groups)
        per_function = {name: [values[i] for i in rows] for name, values in r.per_function.items()}
        scores = RewardResult(total=[r.total[i] for i in rows], per_function=per_function, weights=r.weights,
                              none_count={n: sum(v is None for v in vs) for n, vs in per_function.items()},
                              stats=r.stats)
        return Rollout([self.prompts[g] for g in groups], samples, scores, G)

    @staticmethod
    def concat(rollouts: list["Rollout"]) -> "Rollout":
        first = rollouts[0]
        prompts = [p for r in rollouts for p in r.prompts]
        samples = concat_batches([r.samples for r in rollouts])
        per_function = {name: [x for r in rollouts for x in r.scores.per_function[name]]
                        for name in first.scores.per_function}
        scores = RewardResult(total=[x for r in rollouts for x in r.scores.total], per_function=per_function,
                              weights=first.scores.weights,
                              none_count={n: sum(v is None for v in vs) for n, vs in per_function.items()},
                              stats=rollouts[-1].scores.stats)
        return Rollout(prompts, samples, scores, first.group_size)

    def zero_variance_groups(self) -> list[bool]:
        """Per group: True when every judged reward is equal (no learning signal for a group baseline)."""
        G, totals = self.group_size, self.scores.total
        flags = []
        for g in range(len(self.prompts)):
            judged = [v for v in totals[g * G:(g + 1) * G] if v is not None]
            flags.append(len(judged) <= 1 or max(judged) == min(judged))
        return flags


@dataclass
class EpisodeOptions:
    """Multi-turn rollouts (`tether.rollout.episodes`): a fresh environment per episode and the turn bounds."""

    make_env: object
    max_turns: int
    max_turn_tokens: int


def generate_and_score(sampler, reward_set, prompts: list[Prompt], params: SamplingParams, timer,
                       episodes: EpisodeOptions | None = None) -> Rollout:
    """Sample params.n completions (or episodes) per prompt and score every one with the reward functions; an
    episode's completion is its whole text after the prompt, and its environment's rewards add to the total."""
    with timer.section("generation"):
        if episodes is None:
            samples = sampler.generate([p.ids for p in prompts], params)
        else:
            samples = generate_episodes(sampler, [p.ids for p in prompts],
                                        [{"prompt": p.prompt, **p.columns} for p in prompts], episodes.make_env,
                                        params, max_turns=episodes.max_turns, max_turn_tokens=episodes.max_turn_tokens)
    with timer.section("scoring"):
        rows = [prompts[i] for i in samples.prompt_index]
        columns = {key: [p.columns[key] for p in rows] for key in (prompts[0].columns if prompts else {})}
        columns["completion_ids"] = samples.completion_ids
        columns["completion_lengths"] = [len(ids) for ids in samples.completion_ids]
        scores = reward_set([p.prompt for p in rows], samples.completions, **columns) if reward_set else None
        if isinstance(samples, EpisodeBatch):
            scores = add_env_rewards(scores, samples.env_rewards)
    return Rollout(list(prompts), samples, scores, params.n)


def add_env_rewards(scores: RewardResult | None, env_rewards: list[float | None]) -> RewardResult:
    """The reward functions' result with the environments' rewards as one more function, `env` (weight 1),
    added to the total where given (an episode whose environment gave none keeps the functions' total)."""
    if scores is None:
        return RewardResult(total=list(env_rewards), per_function={"env": list(env_rewards)}, weights={"env": 1.0},
                            none_count={"env": sum(v is None for v in env_rewards)})
    total = [t if e is None else (None if t is None else t + e) for t, e in zip(scores.total, env_rewards)]
    return RewardResult(total=total, per_function={**scores.per_function, "env": list(env_rewards)},
                        weights={**scores.weights, "env": 1.0},
                        none_count={**scores.none_count, "env": sum(v is None for v in env_rewards)},
                        stats=scores.stats)


def sample_rollout(sampler, reward_set, prompts: list[Prompt], stream: PromptStream, params: SamplingParams, *,
                   batch_size: int, seed: int, step: int, timer, dynamic_sampling: bool = False,
                   max_tries: int = 1, chunk_size: int = 0,
                   episodes: EpisodeOptions | None = None) -> tuple[Rollout, Rollout, dict]:
    """This rank's rollout for one step: batch_size prompts (over all ranks) × params.n completions.

    The rank's prompts are sampled `chunk_size` at a time (0: all at once), each call seeded from (seed, step,
    round, the chunk's first position in the step's global batch): when chunk_size divides the prompts per
    rank, every chunk and its seed are the same whatever the number of ranks, and so are the completions.
    With dynamic sampling (DAPO, Yu et al. 2025, eq. 11) groups whose rewards are all equal are dropped and
    more prompts are sampled, up to `max_tries` rounds; if the batch is still short it is filled with
    dropped groups (advantage 0), so every step has the same shape. Returns (rollout to train on, every
    rollout sampled this step (for reward metrics), metrics)."""
    local_size = batch_size // distributed.world_size()
    chunk_size = chunk_size or local_size
    first = distributed.rank() * local_size  # this rank's first prompt in the step's global batch
    kept, dropped, sampled, tries = [], [], [], 0
    for attempt in range(max_tries if dynamic_sampling else 1):
        tries += 1
        chosen = distributed.shard([prompts[i] for i in stream.take(batch_size)])
        rollout = Rollout.concat([
            generate_and_score(sampler, reward_set, chosen[start:start + chunk_size],
                               dataclasses.replace(params, seed=derive_seed(seed, step, attempt, first + start)), timer,
                               episodes)
            for start in range(0, local_size, chunk_size)])
        sampled.append(rollout)
        if not dynamic_sampling:
            kept.append(rollout)
            break
        flat = rollout.zero_variance_groups()
        kept.append(rollout.select([g for g, zero in enumerate(flat) if not zero]))
        dropped.append(rollout.select([g for g, zero in enumerate(flat) if zero]))
        have = distributed.all_reduce_sum(torch.tensor(float(sum(len(r.prompts) for r in kept))))
        if have >= batch_size:
            break
    batch = Rollout.concat(kept)
    filled = max(0, local_size - len(batch.prompts))
    if filled:  # tries exhausted: top up with zero-variance groups (they carry only the KL term)
        spare = Rollout.concat(dropped)
        batch = Rollout.concat([batch, spare.select(list(range(filled)))])
    batch = batch.select(list(range(local_size)))
    metrics = {"sampling_tries": float(tries)}
    if dynamic_sampling:
        metrics["dynamic_sampling_filled_groups"] = float(filled)
    return batch, Rollout.concat(sampled), metrics


def rollout_tensors(rollout: Rollout, pad_id: int, device, *, mask_truncated: bool = False) -> dict:
    """Padded tensors of a rollout (see `RolloutBatch.to_tensors`) plus `loss_mask` (N, C): the completion
    tokens that carry the loss (without truncated completions under DAPO overlong filtering, and without
    completions no reward function could judge)."""
    batch = rollout.samples.to_tensors(pad_id, device)
    keep = ~torch.isnan(rollout.rewards)
    if mask_truncated:
        keep &= ~rollout.truncated
    batch["loss_mask"] = batch["completion_mask"] * keep.to(device).unsqueeze(-1).float()  # (N, C)
    return batch


# ----------------------------------------------------------------------------- forwards


def take(batch: dict, index) -> dict:
    """Rows `index` of every (N, ...) tensor in `batch`; other entries (prompt_length) as they are."""
    return {k: v[index] if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in batch.items()}


def completion_forward(model, batch: dict, *, temperature: float = 1.0, entropy: bool = False,
                       entropy_grad: bool = False, value_head=None):
    """One forward over prompt + completion, read at the completion tokens only.

    Returns (logprobs (n, C), entropy (n, C) or None, values (n, C) or None): log π(token) at `temperature`,
    0 on padding; the entropy of the sampling distribution (with gradient only if `entropy_grad`);
    with `value_head` (a critic sharing the policy's body) V(state before each completion token).
    """
    P = batch["prompt_length"]
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # (n, P+C)
    if value_head is None and shares_prompts(model, batch["prompt_index"]):
        # The G completions of a prompt read one encoding of it (tether.models.shared_prompt).
        shared = completion_logprobs(model, batch, temperature=temperature, entropy=entropy,
                                     entropy_grad=entropy_grad)
        if shared is not None:
            return (*shared, None)
    if value_head is None and not entropy_grad:
        # Only the completion targets are scored; with a plain LM head the prompt positions are never
        # projected onto the vocabulary and the (n, P+C, V) logits never exist (ops.linear_token_logprobs).
        target_mask = torch.zeros_like(attention_mask[:, 1:])  # (n, P+C-1)
        target_mask[:, P - 1:] = batch["completion_mask"]
        logprobs, token_entropy = model_token_logprobs(model, input_ids, attention_mask, temperature=temperature,
                                                       return_entropy=entropy, target_mask=target_mask)
        return logprobs[:, P - 1:], (token_entropy[:, P - 1:] if entropy else None), None
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),  # prompts are left-padded
                output_hidden_states=value_head is not None)
    logits = out.logits[:, P - 1:-1]  # (n, C, V): position P-1+t predicts completion token t
    labels = input_ids[:, P:].masked_fill(batch["completion_mask"] == 0, -100)  # (n, C)
    logprobs = token_logprobs(logits, labels, temperature=temperature)  # (n, C)
    token_entropy = values = None
    if entropy:
        with contextlib.nullcontext() if entropy_grad else torch.no_grad():
            token_entropy = entropy_from_logits(logits if entropy_grad else logits.detach(), temperature=temperature)
        token_entropy = token_entropy * batch["completion_mask"]
    if value_head is not None:
        values = value_head(out.hidden_states[-1][:, P - 1:-1])  # (n, C)
    return logprobs, token_entropy, values


def critic_values(critic, batch: dict) -> Tensor:
    """A separate value model's V(state before each completion token), (n, C)."""
    P = batch["prompt_length"]
    values = critic(batch["input_ids"], batch["attention_mask"],
                    position_ids=position_ids_from_mask(batch["attention_mask"]))  # (n, P+C)
    return values[:, P - 1:-1]


@torch.no_grad()
def scoring_pass(fn, batch: dict, micro_size: int) -> Tensor:
    """`fn(micro_batch) -> (n, C)` over the whole rollout in micro-batches, without gradients: (N, C)."""
    N = batch["input_ids"].shape[0]
    return torch.cat([fn(take(batch, slice(i, i + micro_size))).float() for i in range(0, N, micro_size)])


def logprob_fn(model, temperature: float):
    return lambda micro: completion_forward(model, micro, temperature=temperature)[0]


class Reference(tether.models.reference.Reference):
    """π_ref (`tether.models.reference`: a frozen copy of the starting policy, or under LoRA the policy with
    its adapter disabled) read at a rollout's completion tokens."""

    def logprobs(self, batch: dict, micro_size: int, temperature: float) -> Tensor:
        """log π_ref of every completion token, (N, C)."""
        with self.active() as model:
            return scoring_pass(logprob_fn(model, temperature), batch, micro_size)


def build_reference(policy, needed: bool) -> Reference | None:
    """The reference, or None (no copy, no forward) when β = 0."""
    return Reference.from_policy(policy) if needed else None


def old_logprobs(config: OnlineConfig, model, batch: dict, micro_size: int, temperature: float) -> Tensor:
    """π_old log-probs (N, C). The sampler's are π_old when it sampled from these weights at this temperature
    with the training forward's numerics (the built-in engine); otherwise one no-grad forward."""
    on_policy = config.ppo_epochs == 1 and config.num_minibatches == 1 and config.rollout_engine == "builtin"
    if config.old_logprobs == "sampler" or (config.old_logprobs == "auto" and on_policy):
        return batch["sampling_logprobs"]
    return scoring_pass(logprob_fn(model, temperature), batch, micro_size)


def minibatches(n: int, num_minibatches: int, seed: int) -> list[Tensor]:
    """This rank's rows (of its n) in each of the step's minibatches: a seeded split of the GLOBAL batch that
    is the same whatever the number of ranks. One minibatch: every row, in order.

    A stratified shuffle: each run of M = num_minibatches consecutive rows of the global batch (rank r holds
    rows r·n .. r·n + n − 1) deals one row to each minibatch, in an order drawn from (seed, the run's first
    row). A shuffle of each rank's own rows would put different completions together on different numbers of
    ranks. When M divides n every rank holds whole runs, so 1 process and any number of ranks train on the
    same minibatches. Otherwise the rank's last, shorter run goes to the first minibatches in order, alike on
    every rank, so that the ranks' minibatches still have equal sizes (they step together)."""
    M = num_minibatches
    if M == 1:
        return [torch.arange(n)]
    first_row = distributed.rank() * n  # this rank's first row in the global batch
    assignment = torch.arange(n) % M  # (n,) minibatch of each row; the shorter run keeps this order
    for start in range(0, n - n % M, M):
        generator = torch.Generator().manual_seed(derive_seed(seed, first_row + start))
        assignment[start:start + M] = torch.randperm(M, generator=generator)
    return [rows for m in range(M) if len(rows := (assignment == m).nonzero().flatten())]


def global_counts(batch: dict, index: Tensor, max_len: int) -> dict:
    """The GLOBAL token and sequence counts of a minibatch (all ranks): losses divide by these, so the
    micro-batches' losses sum to the minibatch's and the result does not depend on the split."""
    mask = batch["loss_mask"][index]
    return {"num_tokens": distributed.all_reduce_sum(mask.sum()),
            "num_seqs": distributed.all_reduce_sum(torch.tensor(float(len(index)), device=mask.device)),
            "max_len": max_len}


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """(N,) KL of each completion from the reference, k1 summed over its tokens (Ziegler et al. 2019)."""
    return ((logprobs - ref_logprobs) * mask).sum(-1)


def own_rows(values: Tensor) -> Tensor:
    """This rank's rows of a tensor gathered over ranks with `distributed.all_gather_cat`."""
    n = values.shape[0] // distributed.world_size()
    return values[distributed.rank() * n:(distributed.rank() + 1) * n]


def global_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of `values` (where `mask` is 1) over every rank's batch."""
    mask = torch.ones_like(values) if mask is None else mask
    total = distributed.all_reduce_sum(torch.stack([(values * mask).sum(), mask.sum()]).float())
    return total[0] / total[1].clamp(min=1)


def global_var(values: Tensor, mask: Tensor) -> Tensor:
    """Unbiased variance of `values` where `mask` is 1, over every rank's batch."""
    mean = global_mean(values, mask)
    total = distributed.all_reduce_sum(torch.stack([((values - mean) ** 2 * mask).sum(), mask.sum()]).float())
    return total[0] / (total[1] - 1).clamp(min=1)


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(values − mean) / sqrt(var + eps) over the masked entries of the global batch; 0 where masked
    (`ops.masked_whiten` over all ranks)."""
    whitened = (values - global_mean(values, mask)) * torch.rsqrt(global_var(values, mask) + eps)
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 − Var(R − V) / Var(R) over the masked tokens of the global batch: how much of the return the critic
    predicted (1 perfect, 0 no better than a constant)."""
    return 1 - global_var(returns - values, mask) / global_var(returns, mask).clamp(min=1e-8)


def kl_metrics(old_logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str) -> dict:
    """kl_ref: mean per-token KL estimate of π_old from π_ref; kl_ref_seq: mean over completions of the
    summed k1 (the completion's KL, what the adaptive controllers steer). Over the global batch."""
    token_kl = kl_estimate(old_logprobs, ref_logprobs, estimator)  # (N, C)
    return {"kl_ref": global_mean(token_kl, mask), "kl_ref_seq": global_mean(sequence_kl(old_logprobs, ref_logprobs,
                                                                                           mask))}


# ----------------------------------------------------------------------------- metrics and logging


class UpdateStats:
    """Metrics of one step's update. Loss terms add up over micro-batches (each is its share of the
    minibatch loss) and are averaged over optimizer steps; other metrics are token-weighted means."""

    def __init__(self):
        self.losses: dict[str, Tensor] = {}
        self.means = MetricMeans()
        self.grad_norms: list[Tensor] = []

    def add(self, losses: dict, metrics: dict, tokens: float | Tensor) -> None:
        for key, value in losses.items():
            self.losses[key] = self.losses.get(key, 0.0) + value.detach().float()
        self.means.add(metrics, tokens)

    def optimizer_step(self, grad_norm: Tensor) -> None:
        self.grad_norms.append(grad_norm.detach().float().cpu())

    def reduce(self) -> dict[str, Tensor]:
        updates = max(len(self.grad_norms), 1)
        out = self.means.reduce()
        out.update({key: distributed.all_reduce_sum(value) / updates for key, value in self.losses.items()})
        if self.grad_norms:
            out["grad_norm"] = torch.stack(self.grad_norms).mean()
        return out


def gather_scores(result: RewardResult) -> RewardResult:
    """Every rank's reward values, concatenated in rank order (the result itself in one process)."""
    if distributed.world_size() == 1:
        return result
    parts = distributed.all_gather_object((result.total, result.per_function))
    per_function = {name: [v for _, functions in parts for v in functions[name]] for name in result.per_function}
    return RewardResult(total=[v for total, _ in parts for v in total], per_function=per_function,
                        weights=result.weights, none_count={n: sum(v is None for v in vs)
                                                            for n, vs in per_function.items()},
                        stats=result.stats)


def rollout_metrics(sampled: Rollout, batch: Rollout, tensors: dict) -> dict:
    """Rewards (of everything sampled this step), completion lengths and truncation (of the training batch),
    over all ranks."""
    metrics = gather_scores(sampled.scores).metrics(prefix="reward/")
    metrics["reward_mean"], metrics["reward_std"] = metrics["reward/total/mean"], metrics["reward/total/std"]
    if sampled.group_size > 1:
        flags = [f for part in distributed.all_gather_object(sampled.zero_variance_groups()) for f in part]
        metrics["zero_variance_groups"] = sum(flags) / max(len(flags), 1)
    lengths = distributed.all_gather_cat(tensors["completion_mask"].sum(-1))  # (N_global,)
    truncated = distributed.all_gather_cat(batch.truncated.to(lengths.device).float())  # (N_global,)
    metrics.update({"completion_length_mean": lengths.mean(), "completion_length_max": lengths.max(),
                    "completion_length_min": lengths.min(), "truncated_frac": truncated.mean(),
                    "num_completions": float(len(lengths)), "group_size": float(batch.group_size)})
    if isinstance(batch.samples, EpisodeBatch):  # turns, tool calls, tool errors, tool time
        metrics.update(batch.samples.metrics())
    return metrics


def check_strategy(config) -> None:
    """Online RL samples with each rank's own prompts, so ranks decode different numbers of steps: FSDP, whose
    forwards are collectives, would hang. DDP replicas sample independently."""
    if distributed.world_size() > 1 and config.distributed.strategy == "fsdp":
        raise ConfigError("config key 'distributed.strategy': online RL recipes support ddp only (each rank samples "
                          "its own prompts, which FSDP's collective forwards cannot follow)")


class Timer:
    """Wall-clock seconds per section of a step (generation, scoring, reference, update, ...)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def section(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{name}": seconds for name, seconds in self.seconds.items()}


class SampleWriter:
    """Appends every completion of every `every`-th step to samples.jsonl. Every rank calls `write`; the rank
    with `enabled` (the main rank) writes all ranks' completions, in rank order (the global batch's order).
    On resume, lines of steps after the checkpoint are dropped, so the file equals an uninterrupted run's."""

    def __init__(self, run_dir: Path, every: int, *, start_step: int = 0, enabled: bool = True):
        self.path, self.every, self.enabled = Path(run_dir) / "samples.jsonl", every, enabled and every > 0
        if self.enabled and start_step and self.path.exists():
            trim_step_lines(self.path, start_step)
        elif self.enabled and not start_step and self.path.exists():
            self.path.unlink()

    def write(self, step: int, rollout: Rollout, advantages: Tensor | None = None) -> None:
        if self.every <= 0 or step % self.every:
            return
        rows = []
        for i, prompt in enumerate(rollout.samples.prompt_index):
            row = {"step": step, "prompt": rollout.prompts[prompt].prompt,
                   "completion": rollout.samples.completions[i], "reward": rollout.scores.total[i],
                   "rewards": {name: values[i] for name, values in rollout.scores.per_function.items()},
                   "finish_reason": rollout.samples.finish_reasons[i],
                   "length": len(rollout.samples.completion_ids[i])}
            if advantages is not None:
                row["advantage"] = float(advantages[i])
            if isinstance(rollout.samples, EpisodeBatch):  # turns, tool calls, observations
                row["episode"] = rollout.samples.episode(i)
            rows.append(row)
        rows = distributed.gather_lists(rows)
        if self.enabled:
            with self.path.open("a") as file:
                file.writelines(json.dumps(row) + "\n" for row in rows)


@torch.no_grad()
def evaluate_rewards(sampler, reward_set, prompts: list[Prompt], config: OnlineConfig) -> dict[str, float]:
    """Mean rewards of one completion per held-out prompt (greedy at eval_temperature 0)."""
    params = SamplingParams(temperature=config.eval_temperature, max_new_tokens=config.max_completion_length,
                            stop=config.stop, seed=config.seed, n=1)
    rollout = generate_and_score(sampler, reward_set, prompts, params, Timer(), config.episodes())
    return {f"eval/{k.removeprefix('reward/')}": v for k, v in rollout.scores.metrics(prefix="reward/").items()
            if k.endswith("/mean")}


def load_prompt_sets(config: OnlineConfig, tokenizer, reward_set=None) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, held-out prompts or []), each file's rows checked by `reward_set.check_rows` (e.g.
    the code reward's tests) so that a bad row fails now, naming file, row and field, not mid-training."""
    options = dict(split=config.data_split, max_prompt_length=config.max_prompt_length, overlong=config.overlong,
                   chat_template=config.chat_template)
    sets = []
    for source in (config.data, config.eval_data):
        prompts = load_prompts(source, tokenizer, **options) if source else []
        if reward_set is not None and prompts:
            reward_set.check_rows(source, [(p.row, p.columns) for p in prompts])
        sets.append(prompts)
    return sets[0], sets[1]


def total_steps(config: OnlineConfig, num_prompts: int) -> int:
    """max_steps, or `epochs` passes over the prompts at batch_size prompts per step."""
    return config.max_steps if config.max_steps > 0 else max(1, int(config.epochs * num_prompts) // config.batch_size)


def build_sampler(config: OnlineConfig, model, tokenizer):
    """The rollout engine, sampling from the (unwrapped) policy's current weights."""
    options = {"batch_size": config.generation_batch_size} if config.generation_batch_size else {}
    return get_sampler(config.rollout_engine, unwrap(model), tokenizer, **options)


def final_evaluation(run, sampler, reward_set, prompts: list[Prompt], config: OnlineConfig) -> None:
    """Held-out rewards after training, logged and written to eval.json."""
    if not prompts:
        return
    result = evaluate_rewards(sampler, reward_set, prompts, config)
    log.info("held-out: %s", ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    if run.main:
        (run.dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")


def sampling_params(config: OnlineConfig, group_size: int, temperature: float) -> SamplingParams:
    return SamplingParams(temperature=temperature, top_p=config.top_p, top_k=config.top_k, min_p=config.min_p,
                          max_new_tokens=config.max_completion_length, min_new_tokens=config.min_completion_length,
                          n=group_size, stop=config.stop)


def masked_stats(values: Tensor, mask: Tensor, prefix: str) -> dict[str, Tensor]:
    """{prefix}_mean and {prefix}_std over the masked entries of the global batch."""
    return {f"{prefix}_mean": global_mean(values, mask), f"{prefix}_std": global_var(values, mask).sqrt()}
