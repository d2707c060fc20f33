"""Multi-turn rollouts: the model writes, a tool or environment answers, the model continues, until it is done.

    batch = generate_episodes(sampler, prompt_ids, rows, make_env, params, max_turns=4)
    tensors = batch.to_tensors(pad_id)   # the same (N, C) tensors as a single-turn rollout

An episode's completion is everything after the prompt: the model's turns AND the observations between them.
`completion_masks` marks the model-written tokens (1) and the observation tokens (0); `to_tensors` puts that
mask in `completion_mask`, so the online losses train only on what the model wrote, while the forward still
reads the observations as context. Observation tokens have sampling log-prob 0 (they were not sampled).

Each round, every unfinished episode decodes its next turn in ONE sampler call (episodes at different turns
share a decode batch), until EOS, a stop string of its environment (a tool call's closing tag) or its token
budget; then the environments' `step`s run concurrently in a thread pool (a slow tool does not hold up the
others' turns), their observations are tokenized and appended, and the next round starts. Budgets:
`max_turn_tokens` per model turn, `params.max_new_tokens` per episode (model and observation tokens together),
`max_turns` model turns. A turn cut by a budget is a sample of the policy all the same (a prefix of one).
"""

from __future__ import annotations

import dataclasses
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from tether.rollout.engine import RolloutBatch
from tether.rollout.params import SamplingParams


@dataclass
class EpisodeOptions:
    """How a run rolls out episodes: a factory of fresh per-episode environments (`tether.envs.get_env`, passed in
    from above: this layer does not import `envs`) and the turn budgets."""

    make_env: Callable
    max_turns: int = 4
    max_turn_tokens: int = 0


@dataclass
class EpisodeBatch(RolloutBatch):
    """A RolloutBatch of episodes; rows are grouped prompt by prompt as in RolloutBatch."""

    completion_masks: list[list[int]] = field(default_factory=list)
    """Per episode, aligned with completion_ids: 1 on model-written tokens, 0 on observation tokens."""
    turns: list[list[dict]] = field(default_factory=list)
    """Per episode, the readable transcript: [{"role": "model" | "env", "text": ...}, ...]."""
    env_rewards: list[float | None] = field(default_factory=list)
    """Per episode, the sum of the rewards its environment gave (None when it gave none)."""
    tool_calls: list[int] = field(default_factory=list)
    tool_errors: list[int] = field(default_factory=list)
    tool_seconds: list[float] = field(default_factory=list)

    def to_tensors(self, pad_id: int, device: torch.device | str | None = None) -> dict:
        """`RolloutBatch.to_tensors`, with `completion_mask` (N, C) 1 only on model-written tokens; the
        attention_mask still covers the observation tokens (context)."""
        tensors = super().to_tensors(pad_id)
        mask = torch.zeros(tensors["completion_mask"].shape, dtype=torch.float32)  # (N, C)
        for row, model_written in enumerate(self.completion_masks):
            mask[row, :len(model_written)] = torch.tensor(model_written, dtype=torch.float32)
        tensors["completion_mask"] = mask
        tensors["sampling_logprobs"] = tensors["sampling_logprobs"] * mask
        if device is not None:
            tensors = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}
        return tensors

    @property
    def num_turns(self) -> list[int]:
        return [sum(t["role"] == "model" for t in turns) for turns in self.turns]

    def metrics(self) -> dict[str, float]:
        """Means over episodes: model turns, tool calls, tool errors, seconds in tools; the tool-call rate."""
        n = max(len(self.turns), 1)
        return {"episode/turns_mean": sum(self.num_turns) / n, "episode/tool_calls_mean": sum(self.tool_calls) / n,
                "episode/tool_errors_mean": sum(self.tool_errors) / n,
                "episode/tool_call_rate": sum(c > 0 for c in self.tool_calls) / n,
                "episode/tool_seconds": float(sum(self.tool_seconds))}

    def episode(self, row: int) -> dict:
        """A readable record of one episode (for samples.jsonl)."""
        return {"turns": self.turns[row], "tool_calls": self.tool_calls[row], "tool_errors": self.tool_errors[row],
                "env_reward": self.env_rewards[row]}


def select_rows(batch: RolloutBatch, groups: list[int]) -> RolloutBatch:
    """The batch restricted to the given prompt groups, in that order (episodes keep their extra fields)."""
    G = batch.n
    rows = [g * G + j for g in groups for j in range(G)]
    values = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if f.name == "prompt_ids":
            values[f.name] = [value[g] for g in groups]
        elif f.name == "prompt_index":
            values[f.name] = [k for k in range(len(groups)) for _ in range(G)]
        else:
            values[f.name] = [value[i] for i in rows] if len(value) else []
    return type(batch)(**values)


def concat_batches(batches: list[RolloutBatch]) -> RolloutBatch:
    """One batch from consecutive ones (prompt indices renumbered)."""
    values, offset = {}, 0
    for f in dataclasses.fields(batches[0]):
        values[f.name] = [x for b in batches for x in getattr(b, f.name)]
    values["prompt_index"] = []
    for b in batches:
        values["prompt_index"] += [offset + i for i in b.prompt_index]
        offset += len(b.prompt_ids)
    return type(batches[0])(**values)


@dataclass
class _Episode:
    prompt: int
    env: object
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    turns: list[dict] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    finish_reason: str = "length"
    model_turns: int = 0
    done: bool = False

    def append(self, ids: list[int], logprobs: list[float], model_written: bool) -> None:
        self.ids += ids
        self.logprobs += logprobs if model_written else [0.0] * len(ids)
        self.mask += [int(model_written)] * len(ids)


def _turn_seed(seed: int | None, turn: int) -> int | None:
    if seed is None:
        return None
    return int.from_bytes(hashlib.sha256(f"{seed},{turn}".encode()).digest()[:8], "little") & (2**63 - 1)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def generate_episodes(sampler, prompt_ids: list[list[int]], rows: list[dict], make_env, params: SamplingParams, *,
                      max_turns: int = 4, max_turn_tokens: int = 0, max_workers: int = 8) -> EpisodeBatch:
    """params.n episodes per prompt (prompt_ids[i] with dataset row rows[i]), each with a fresh `make_env()`.

    params.max_new_tokens bounds an episode's tokens after the prompt (model + observations); max_turn_tokens
    (0: no own bound) a model turn. The sampler must have `.tokenizer` (the built-in engine has)."""
    tokenizer = sampler.tokenizer
    episodes = [_Episode(prompt=i, env=make_env()) for i in range(len(prompt_ids)) for _ in range(params.n)]
    budget = params.max_new_tokens
    try:
        for episode in episodes:
            observation = episode.env.reset(dict(rows[episode.prompt]))
            if observation:
                episode.append(_encode(tokenizer, observation)[:budget], [], model_written=False)
                episode.turns.append({"role": "env", "text": observation})
        with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tether-env") as pool:
            for turn in range(max_turns):
                active = [e for e in episodes if not e.done and len(e.ids) < budget]
                for e in episodes:
                    if not e.done and len(e.ids) >= budget:
                        e.done, e.finish_reason = True, "length"
                if not active:
                    break
                _model_turn(sampler, prompt_ids, active, params, turn, max_turn_tokens)
                _env_turn(pool, tokenizer, active, budget, last_turn=turn + 1 == max_turns)
        return _to_batch(tokenizer, prompt_ids, episodes, params.n)
    finally:
        for episode in episodes:
            if hasattr(episode.env, "close"):
                episode.env.close()


def _model_turn(sampler, prompt_ids, active: list[_Episode], params: SamplingParams, turn: int,
                max_turn_tokens: int) -> None:
    """One sampler call decodes the next turn of every active episode (the first turn shares each prompt's
    prefill over its n episodes)."""
    stops = list(dict.fromkeys(params.stop + [s for e in active for s in getattr(e.env, "stop", [])]))
    limits = [params.max_new_tokens - len(e.ids) for e in active]
    if max_turn_tokens:
        limits = [min(limit, max_turn_tokens) for limit in limits]
    step_params = dataclasses.replace(params, max_new_tokens=max(limits), stop=stops, include_stop_str_in_output=True,
                                      seed=_turn_seed(params.seed, turn),
                                      min_new_tokens=min(params.min_new_tokens, min(limits)))
    fresh = len(active) == len(prompt_ids) * params.n and all(not e.ids for e in active)
    if turn == 0 and fresh:  # the n episodes of a prompt start from one prefill
        out = sampler.generate(prompt_ids, step_params)
    else:
        out = sampler.generate([prompt_ids[e.prompt] + e.ids for e in active], dataclasses.replace(step_params, n=1))
    for episode, ids, logprobs, reason, limit in zip(active, out.completion_ids, out.completion_logprobs,
                                                     out.finish_reasons, limits):
        if len(ids) > limit:  # sampled past this episode's own budget: keep the prefix it was allowed
            ids, logprobs, reason = ids[:limit], logprobs[:limit], "length"
        episode.append(ids, logprobs, model_written=True)
        episode.model_turns += 1
        episode.finish_reason = reason
        text = sampler.tokenizer.decode(ids[:-1] if reason == "eos" else ids, skip_special_tokens=True)
        episode.turns.append({"role": "model", "text": text})


def _env_turn(pool, tokenizer, active: list[_Episode], budget: int, last_turn: bool) -> None:
    """Every active episode's environment reads its turn, concurrently; observations are appended."""
    futures = [pool.submit(e.env.step, e.turns[-1]["text"]) for e in active]
    for episode, future in zip(active, futures):
        observation, reward, done = future.result()
        if reward is not None:
            episode.rewards.append(float(reward))
        env_max_turns = getattr(episode.env, "max_turns", None)
        episode.done = (done or last_turn or episode.finish_reason == "eos"
                        or (env_max_turns is not None and episode.model_turns >= env_max_turns))
        if observation and not episode.done:
            ids = _encode(tokenizer, observation)
            room = budget - len(episode.ids)
            episode.append(ids[:room], [], model_written=False)
            episode.turns.append({"role": "env", "text": observation})
            if len(ids) >= room:
                episode.done, episode.finish_reason = True, "length"


def _to_batch(tokenizer, prompt_ids, episodes: list[_Episode], n: int) -> EpisodeBatch:
    texts = []
    for e in episodes:
        ids = e.ids[:-1] if e.finish_reason == "eos" else e.ids
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return EpisodeBatch(
        prompt_ids=prompt_ids,
        completion_ids=[e.ids for e in episodes],
        completion_logprobs=[e.logprobs for e in episodes],
        finish_reasons=[e.finish_reason for e in episodes],
        completions=texts,
        prompt_index=[e.prompt for e in episodes],
        completion_masks=[e.mask for e in episodes],
        turns=[e.turns for e in episodes],
        env_rewards=[sum(e.rewards) if e.rewards else None for e in episodes],
        tool_calls=[getattr(e.env, "tool_calls", 0) for e in episodes],
        tool_errors=[getattr(e.env, "tool_errors", 0) for e in episodes],
        tool_seconds=[getattr(e.env, "tool_seconds", 0.0) for e in episodes],
    )
