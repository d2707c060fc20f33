"""One step's rollout: prompts → G sampled completions each → scores, and the tensors a trainer reads.

    prompts ──sampler.generate──► completions ──reward_set(prompts, completions, **columns)──► Rollout

`Rollout` keeps a step's prompts, samples and scores aligned group by group; `sample_rollout` draws a step's
prompts from the stream (with DAPO's dynamic sampling) and `rollout_tensors` pads it for the forward.
The reward set is any callable with the reward contract returning a `tether.rewards.RewardResult` (this
layer sits below `rewards` and does not import it).

Tensor names: N completions in a step (B prompts × G samples, group by group), C completion tokens
(right-padded), P prompt tokens (left-padded). Every per-token tensor of a rollout is (N, C) and lines
up with `completion_mask`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tether.data.batching import derive_seed
from tether.rollout.engine import RolloutBatch
from tether.rollout.episodes import EpisodeBatch, EpisodeOptions, concat_batches, generate_episodes, select_rows
from tether.rollout.prompts import Prompt, PromptStream
from tether.rollout.params import SamplingParams
from tether.runtime import distributed

if TYPE_CHECKING:
    from tether.rewards import RewardResult


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
        samples = select_rows(self.samples, groups)  # episodes keep their fields
        per_function = {name: [values[i] for i in rows] for name, values in r.per_function.items()}
        scores = dataclasses.replace(r, total=[r.total[i] for i in rows], per_function=per_function,
                                     none_count={n: sum(v is None for v in vs) for n, vs in per_function.items()})
        return Rollout([self.prompts[g] for g in groups], samples, scores, G)

    @staticmethod
    def concat(rollouts: list["Rollout"]) -> "Rollout":
        first = rollouts[0]
        prompts = [p for r in rollouts for p in r.prompts]
        samples = concat_batches([r.samples for r in rollouts])
        per_function = {name: [x for r in rollouts for x in r.scores.per_function[name]]
                        for name in first.scores.per_function}
        scores = dataclasses.replace(rollouts[-1].scores, total=[x for r in rollouts for x in r.scores.total],
                                     per_function=per_function, weights=first.scores.weights,
                                     none_count={n: sum(v is None for v in vs) for n, vs in per_function.items()})
        return Rollout(prompts, samples, scores, first.group_size)

    def zero_variance_groups(self) -> list[bool]:
        """Per group: True when every judged reward is equal (no learning signal for a group baseline)."""
        G, totals = self.group_size, self.scores.total
        flags = []
        for g in range(len(self.prompts)):
            judged = [v for v in totals[g * G:(g + 1) * G] if v is not None]
            flags.append(len(judged) <= 1 or max(judged) == min(judged))
        return flags


def generate_and_score(sampler, reward_set, prompts: list[Prompt], params: SamplingParams, timer,
                       episodes: EpisodeOptions | None = None) -> Rollout:
    """Sample params.n completions per prompt (or, with `episodes`, params.n multi-turn episodes: a completion
    is then the episode's whole text after the prompt) and score every one with the reward functions. An
    episode's environment rewards reach them as the column `env_rewards` (the `env` reward of tether.envs)."""
    with timer.section("generation"):
        if episodes is None:
            samples = sampler.generate([p.ids for p in prompts], params)
        else:
            samples = generate_episodes(sampler, [p.ids for p in prompts],
                                        [{"prompt": p.prompt, **p.columns} for p in prompts], episodes.make_env,
                                        params, max_turns=episodes.max_turns, max_turn_tokens=episodes.max_turn_tokens)
    return score_samples(reward_set, prompts, samples, params.n, timer)


def score_samples(reward_set, prompts: list[Prompt], samples: RolloutBatch, group_size: int, timer,
                  **extra_columns: list) -> Rollout:
    """Score sampled completions: the reward functions get each row's prompt columns, `completion_ids`,
    `completion_lengths` and `extra_columns` (one value per completion, e.g. an opponent's completion)."""
    with timer.section("scoring"):
        rows = [prompts[i] for i in samples.prompt_index]
        columns = {key: [p.columns[key] for p in rows] for key in (prompts[0].columns if prompts else {})}
        columns["completion_ids"] = samples.completion_ids
        columns["completion_lengths"] = [len(ids) for ids in samples.completion_ids]
        if isinstance(samples, EpisodeBatch):  # the environments' rewards, for the `env` reward function
            columns["env_rewards"] = samples.env_rewards
        scores = reward_set([p.prompt for p in rows], samples.completions, **columns, **extra_columns)
    return Rollout(list(prompts), samples, scores, group_size)


def sample_rollout(sampler, reward_set, prompts: list[Prompt], stream: PromptStream, params: SamplingParams, *,
                   batch_size: int, seed: int, step: int, timer, dynamic_sampling: bool = False,
                   max_tries: int = 1, chunk_size: int = 0, generate=generate_and_score
                   ) -> tuple[Rollout, Rollout, dict]:
    """This rank's rollout for one step: batch_size prompts (over all ranks) × params.n completions.

    The rank's prompts are sampled `chunk_size` at a time (0: all at once), each call seeded from (seed, step,
    round, the chunk's first position in the step's global batch): when chunk_size divides the prompts per
    rank, every chunk and its seed are the same whatever the number of ranks, and so are the completions.
    With dynamic sampling (DAPO, Yu et al. 2025, eq. 11) groups whose rewards are all equal are dropped and
    more prompts are sampled, up to `max_tries` rounds; if the batch is still short it is filled with
    dropped groups (advantage 0), so every step has the same shape. Returns (rollout to train on, every
    rollout sampled this step (for reward metrics), metrics). `generate(sampler, reward_set, prompts, params,
    timer) -> Rollout` samples and scores one chunk (`generate_and_score`; a recipe may sample more with it,
    e.g. Nash-MD's opponents)."""
    reward_set.step = step + 1  # named if a reward function runs past its time limit
    local_size = batch_size // distributed.world_size()
    chunk_size = chunk_size or local_size
    first = distributed.rank() * local_size  # this rank's first prompt in the step's global batch
    kept, dropped, sampled, tries = [], [], [], 0
    for attempt in range(max_tries if dynamic_sampling else 1):
        tries += 1
        chosen = distributed.shard([prompts[i] for i in stream.take(batch_size)])
        rollout = Rollout.concat([
            generate(sampler, reward_set, chosen[start:start + chunk_size],
                               dataclasses.replace(params, seed=derive_seed(seed, step, attempt, first + start)), timer)
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
