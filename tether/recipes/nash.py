"""Nash-MD: the policy no other policy beats, against a pairwise preference model (Munos et al. 2024).

    π* = argmax_π min_π' P(π ≻ π')            (a Nash equilibrium; it exists for non-transitive preferences)

    for each step:
        sample G completions y_1..y_G of each of B prompts x from π_θ
        sample G opponents y'_1..y'_G from the opponent:                              (`opponent=`)
            geometric: π_θ^{1−β} π_ref^{β}, token by token   (Munos et al. 2024, eq. 6, §7; β = mixture_coef)
            mixture:   one of the past policies π_0, π_k, π_2k, …, picked uniformly  (a fictitious-play opponent)
            self:      the other samples of the same prompt                          (self-play, online IPO / SPPO)
        r_i = P(y_i ≻ y'_i | x)  by the preference model (`tether pm`)      (self: mean over the group's others)
        A_i = r_i − 1/2 − τ Σ_t log(π_θ(y_t|·) / π_ref(y_t|·))        (Nash-MD-PG, Munos et al. 2024, §7)
        L = −agg_t[ min(ρ_t A_i, clip(ρ_t, 1−ε, 1+ε) A_i) ],  ρ_t = π_θ / π_old (1 on-policy: REINFORCE)

1/2 = P(π ≻ π) is the exact baseline of a symmetric game; τ is `kl_coef`. Other reward functions in
`rewards` are scored and logged beside it (weight 0), or added to r with their weights. See docs/nash.md.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tether import models
from tether.config import ConfigError
from tether.data.batching import split_micro_batches
from tether.losses import clipped_policy_loss, kl_estimate
from tether.models.preference import MARKER_FILE
from tether.models.reference import freeze
from tether.preference_game import preference_advantages
from tether.recipes.online import (OnlineConfig, PromptStream, Rollout, SampleWriter, Timer, UpdateStats,
                                   build_reference, build_sampler, check_strategy, completion_forward, derive_seed,
                                   global_counts, kl_metrics, load_prompt_sets, minibatches, old_logprobs,
                                   rollout_metrics, rollout_tensors, sampling_params, take, total_steps)
from tether.rewards import RewardSet
from tether.rollout import get_sampler
from tether.rollout.mixture import GeometricMixtureSampler
from tether.runtime import distributed
from tether.runtime.run import Run, autocast

OPPONENT_COLUMN = "nash_opponent"  # the rows' column holding each sample's opponent completion


@dataclass
class NashConfig(OnlineConfig):
    """Nash-MD against a pairwise preference model: sample from π_θ and from an opponent, reward = P(y ≻ y')."""

    preference_model: str = ""
    """The `final/` folder of `tether pm` (required)."""
    opponent: Literal["geometric", "mixture", "self"] = "geometric"
    """geometric: π_θ^{1−β} π_ref^{β} token by token (Nash-MD); mixture: a uniformly chosen past policy
    (snapshots every snapshot_steps); self: the other samples of the same prompt (self-play)."""
    mixture_coef: float = 0.125
    """β of the geometric mixture π_θ^{1−β} π_ref^{β} (0: the opponent is π_θ itself; 1: π_ref)."""
    snapshot_steps: int = 10
    """opponent=mixture: keep a copy of the policy every N steps (π_0, the start, is always in the pool)."""
    max_snapshots: int = 8
    """opponent=mixture: most past policies kept (the oldest after π_0 is dropped first)."""
    preference_batch_size: int = 64
    """Pairs per preference-model forward."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token estimator of KL(π_θ‖π_ref) subtracted from the reward, τ·Σ_t KL_t (k1: the Nash-MD-PG term)."""

    def validate(self) -> None:
        super().validate()
        if not self.preference_model:
            raise ConfigError("config key 'preference_model': required, the final/ folder of `tether pm`")
        if not (Path(self.preference_model) / MARKER_FILE).is_file():
            raise ConfigError(f"config key 'preference_model': {self.preference_model} is not a preference model "
                              f"folder (no {MARKER_FILE}); train one with `tether pm`")
        if not 0.0 <= self.mixture_coef <= 1.0:
            raise ConfigError(f"config key 'mixture_coef': expected 0 <= value <= 1, got {self.mixture_coef}")
        if self.snapshot_steps < 1 or self.max_snapshots < 1:
            raise ConfigError("config keys 'snapshot_steps' and 'max_snapshots': must be >= 1")
        if self.opponent == "self" and min(self.group_size, self.group_size_end or self.group_size) < 2:
            raise ConfigError("config key 'group_size': opponent=self plays the group's samples against each "
                              "other and needs group_size >= 2")
        if self.opponent == "geometric" and self.lora.r > 0:
            raise ConfigError("config key 'opponent': geometric samples π_θ and π_ref side by side, which needs a "
                              "full-weight policy; use lora.r=0 or opponent=mixture")
        if self.ppo_epochs != 1 or self.num_minibatches != 1 or self.rollout_engine != "builtin":
            raise ConfigError("config keys 'ppo_epochs', 'num_minibatches', 'rollout_engine': Nash-MD here is "
                              "on-policy with the builtin engine (1, 1, builtin)")


class Opponent:
    """Samples each policy sample's opponent completion (the `opponent` key); `None` for self-play."""

    def __init__(self, config: NashConfig, policy, reference, tokenizer):
        self.config, self.kind, self.tokenizer = config, config.opponent, tokenizer
        self.pool = [copy.deepcopy(models.unwrap(policy).state_dict())] if self.kind == "mixture" else []
        if self.kind == "geometric":
            self.sampler = GeometricMixtureSampler(models.unwrap(policy), reference.frozen, tokenizer,
                                                   beta=config.mixture_coef)
        elif self.kind == "mixture":
            self.model = freeze(copy.deepcopy(models.unwrap(policy)))
            self.sampler = get_sampler("builtin", self.model, tokenizer)

    def sample(self, prompt_ids: list[list[int]], params, step: int) -> list[str] | None:
        """Opponent completions, G per prompt, row for row with the policy's samples."""
        if self.kind == "self":
            return None
        if self.kind == "mixture":
            pick = random.Random(derive_seed(self.config.seed, step, 7)).randrange(len(self.pool))
            self.model.load_state_dict(self.pool[pick])
        # Its own seed: with the policy's, a mixture close to π_θ would draw the same tokens (P = 1/2, no signal).
        params = dataclasses.replace(params, seed=derive_seed(self.config.seed, step, distributed.rank(), 1))
        return self.sampler.generate(prompt_ids, params).completions

    def after_step(self, policy, step: int) -> None:
        if self.kind == "mixture" and step % self.config.snapshot_steps == 0:
            self.pool.append(copy.deepcopy(models.unwrap(policy).state_dict()))
            if len(self.pool) > self.config.max_snapshots:
                self.pool.pop(1)  # π_0 stays


def reward_specs(config: NashConfig) -> list[dict]:
    opponent = "group" if config.opponent == "self" else f"column:{OPPONENT_COLUMN}"
    return [{"name": "preference_model", "path": config.preference_model, "opponent": opponent,
             "batch_size": config.preference_batch_size}] + list(config.rewards)


def sample_step(sampler, opponent: Opponent, reward_set: RewardSet, prompts, params, *, step: int, timer) -> Rollout:
    """The sampling step: G policy samples and G opponent samples per prompt, scored: r = P(y ≻ y') (+ logs)."""
    with timer.section("generation"):
        samples = sampler.generate([p.ids for p in prompts], params)
        opponents = opponent.sample([p.ids for p in prompts], params, step)
    with timer.section("scoring"):
        rows = [prompts[i] for i in samples.prompt_index]
        columns = {key: [p.columns[key] for p in rows] for key in prompts[0].columns}
        if opponents is not None:
            columns[OPPONENT_COLUMN] = opponents
        scores = reward_set([p.prompt for p in rows], samples.completions, **columns)
    return Rollout(list(prompts), samples, scores, params.n)


def nash_loss(model, micro: dict, config: NashConfig, *, counts: dict, temperature: float):
    """The loss step: the policy-gradient surrogate of this micro-batch's advantages (N,), its share of the
    global minibatch (`counts`). Returns (loss, metrics)."""
    logprobs, _, _ = completion_forward(model, micro, temperature=temperature)  # (n, C)
    return clipped_policy_loss(logprobs, micro["old_logprobs"], micro["advantages"], micro["loss_mask"],
                               clip_low=config.clip_low, clip_high=config.clip_high,
                               agg_mode=config.loss_aggregation, **counts)


def train(config: NashConfig) -> Path:
    """Run Nash-MD as configured; returns the `final/` model folder."""
    run = Run(config)
    check_strategy(config)
    model, tokenizer = models.load(config.model, lora=config.lora, seed=config.seed)
    model.to(run.device)
    reward_set = RewardSet(reward_specs(config))
    prompts, _ = load_prompt_sets(config, tokenizer, reward_set)
    reference = build_reference(model, config.kl_coef > 0 or config.opponent == "geometric")
    opponent = Opponent(config, model, reference, tokenizer)
    model = run.wrap(model)
    sampler = build_sampler(config, model, tokenizer)
    stream = PromptStream(len(prompts), config.seed)
    num_steps = total_steps(config, len(prompts))
    optimizer, scheduler = run.optimizer(model, num_steps)
    start_step, extra = run.start(model, tokenizer, optimizer, scheduler, num_steps)
    if extra:
        stream.cursor = extra["prompt_cursor"]
    samples = SampleWriter(run.dir, config.sample_steps, start_step=start_step, enabled=run.main)
    tau, temperature = config.kl_coef, config.temperature

    model.train()
    for step in range(start_step, num_steps):
        timer = Timer()
        # 1. Sampling: policy and opponent, scored by the preference model.
        chosen = distributed.shard([prompts[i] for i in stream.take(config.batch_size)])
        params = dataclasses.replace(sampling_params(config, config.group_size, temperature),
                                     seed=derive_seed(config.seed, step, distributed.rank()))
        rollout = sample_step(sampler, opponent, reward_set, chosen, params, step=step, timer=timer)
        batch = rollout_tensors(rollout, tokenizer.pad_token_id, run.device)
        N = batch["input_ids"].shape[0]
        micro_size = config.micro_batch_size or N
        batch["old_logprobs"] = old_logprobs(config, model, batch, micro_size, temperature)

        # 2. Advantage: P(y ≻ y') − 1/2 − τ Σ_t KL_t (NaN = could not judge: no loss).
        advantages = preference_advantages(rollout.rewards.to(run.device))  # (N,)
        kl = {}
        if tau > 0:
            with timer.section("reference"), autocast(run):
                batch["ref_logprobs"] = reference.logprobs(batch, micro_size, temperature)
            token_kl = kl_estimate(batch["old_logprobs"], batch["ref_logprobs"], config.kl_estimator)  # (N, C)
            advantages = advantages - tau * (token_kl * batch["completion_mask"]).sum(-1)
            kl = kl_metrics(batch["old_logprobs"], batch["ref_logprobs"], batch["completion_mask"],
                            config.kl_estimator)
        batch["advantages"] = torch.nan_to_num(advantages, nan=0.0)

        # 3. One on-policy gradient step.
        stats = UpdateStats()
        with timer.section("update"):
            index = minibatches(N, 1, derive_seed(config.seed, step))[0]
            counts = global_counts(batch, index, config.max_completion_length)
            for micro_index in split_micro_batches(index, micro_size):
                micro = take(batch, micro_index)
                with autocast(run):
                    loss, metrics = nash_loss(model, micro, config, counts=counts, temperature=temperature)
                (loss * distributed.world_size()).backward()
                stats.add({"loss": loss}, metrics, micro["loss_mask"].sum())
            grad_norm, _ = run.guard.step(model, optimizer, scheduler, config.max_grad_norm)
            stats.optimizer_step(grad_norm)
        sampler.load_weights(model)
        opponent.after_step(model, step + 1)

        metrics = {**rollout_metrics(rollout, rollout, batch), **kl, **stats.reduce(), "kl_coef": tau,
                   **timer.metrics()}
        samples.write(step + 1, rollout, batch["advantages"])
        run.end_step(step + 1, metrics, model=model, tokenizer=tokenizer, tokens=int(batch["attention_mask"].sum()),
                     extra=lambda: {"prompt_cursor": stream.cursor})
    return run.finish(model, tokenizer)
