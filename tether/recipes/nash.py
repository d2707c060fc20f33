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
import functools
import random
from pathlib import Path

import torch

from tether.config.nash import NashConfig
from tether.data.batching import derive_seed
from tether.losses import clipped_policy_loss, kl_estimate
from tether.models import unwrap
from tether.models.forward import completion_forward
from tether.models.reference import freeze
from tether.online import setup_online
from tether.preference_game import preference_advantages
from tether.rewards import RewardSet
from tether.rollout import get_sampler
from tether.rollout.mixture import GeometricMixtureSampler
from tether.rollout.rollout import Rollout, score_samples
from tether.runtime.run import Run

OPPONENT_COLUMN = "nash_opponent"  # the rows' column holding each sample's opponent completion
OPPONENT_SEED = 1  # the opponent's sampling seed is derived from the policy's and this


class Opponent:
    """Samples each policy sample's opponent completion (the `opponent` key); `None` for self-play.

    opponent=mixture keeps a pool of past policies' weights: π_0 (the start) and a snapshot every
    `snapshot_steps` steps, at most `max_snapshots`; the pool is saved in checkpoints (`state_dict`)."""

    def __init__(self, config: NashConfig, policy, reference, tokenizer):
        self.config, self.kind = config, config.opponent
        self.pool = [self.snapshot(policy)] if self.kind == "mixture" else []
        if self.kind == "geometric":
            self.sampler = GeometricMixtureSampler(unwrap(policy), reference.frozen, tokenizer,
                                                   beta=config.mixture_coef)
        elif self.kind == "mixture":
            self.model = freeze(copy.deepcopy(unwrap(policy)))
            self.sampler = get_sampler("builtin", self.model, tokenizer)

    @staticmethod
    def snapshot(policy) -> dict:
        return {name: value.detach().clone() for name, value in unwrap(policy).state_dict().items()}

    def sample(self, prompt_ids: list[list[int]], params) -> list[str] | None:
        """Opponent completions, G per prompt, row for row with the policy's samples. The past policy and the
        samples are drawn from the policy's seed (step, chunk), so a resumed run draws the same."""
        if self.kind == "self":
            return None
        # Its own seed: with the policy's, a mixture close to π_θ would draw the same tokens (P = 1/2, no signal).
        params = dataclasses.replace(params, seed=derive_seed(params.seed, OPPONENT_SEED))
        if self.kind == "mixture":
            self.model.load_state_dict(self.pool[random.Random(params.seed).randrange(len(self.pool))])
        return self.sampler.generate(prompt_ids, params).completions

    def after_step(self, policy, step: int) -> None:
        if self.kind == "mixture" and step % self.config.snapshot_steps == 0:
            self.pool.append(self.snapshot(policy))
            if len(self.pool) > self.config.max_snapshots:
                self.pool.pop(1)  # π_0 stays

    def state_dict(self) -> dict:
        return {"pool": self.pool}

    def load_state_dict(self, state: dict) -> None:
        self.pool = [{name: value.clone() for name, value in weights.items()} for weights in state["pool"]]


def reward_specs(config: NashConfig) -> list[dict]:
    opponent = "group" if config.opponent == "self" else f"column:{OPPONENT_COLUMN}"
    return [{"name": "preference_model", "path": config.preference_model, "opponent": opponent,
             "batch_size": config.preference_batch_size}] + list(config.rewards)


def sample_step(sampler, reward_set: RewardSet, prompts, params, timer, *, opponent: Opponent) -> Rollout:
    """The sampling step: G policy samples and G opponent samples per prompt, scored: r = P(y ≻ y') (+ logs).
    `OnlineRun.generate` (training and held-out evaluation) with the opponent bound."""
    with timer.section("generation"):
        samples = sampler.generate([p.ids for p in prompts], params)
        opponents = opponent.sample([p.ids for p in prompts], params)
    columns = {} if opponents is None else {OPPONENT_COLUMN: opponents}
    return score_samples(reward_set, prompts, samples, params.n, timer, **columns)


def nash_loss(model, micro: dict, config: NashConfig, *, counts: dict, temperature: float):
    """The loss step: the policy-gradient surrogate of this micro-batch's advantages (N,), its share of the
    global minibatch (`counts`). Returns (loss, loss terms, metrics)."""
    logprobs, _, _ = completion_forward(model, micro, temperature=temperature)  # (n, C)
    loss, metrics = clipped_policy_loss(logprobs, micro["old_logprobs"], micro["advantages"], micro["loss_mask"],
                                        clip_low=config.clip_low, clip_high=config.clip_high,
                                        agg_mode=config.loss_aggregation, **counts)
    return loss, {"loss": loss}, metrics


def train(config: NashConfig) -> Path:
    """Run Nash-MD as configured; returns the `final/` model folder."""
    online = setup_online(Run(config), config, reward_set=RewardSet(reward_specs(config)))
    opponent = Opponent(config, online.model, online.reference, online.tokenizer)
    online.generate = functools.partial(sample_step, opponent=opponent)
    extra = online.start()
    if extra and opponent.kind == "mixture":
        opponent.load_state_dict(extra["opponent"])

    for step in online.steps():
        # 1. Sampling: policy and opponent, scored by the preference model; π_old, π_ref log-probs (N, C).
        exp = online.experience(step)
        batch = exp.batch

        # 2. Advantage: P(y ≻ y') − 1/2 − τ Σ_t KL_t (NaN = could not judge: no loss).
        advantages = preference_advantages(exp.rollout.rewards.to(online.run.device))  # (N,)
        if exp.beta > 0:
            token_kl = kl_estimate(batch["old_logprobs"], batch["ref_logprobs"], config.kl_estimator)  # (N, C)
            advantages = advantages - exp.beta * (token_kl * batch["completion_mask"]).sum(-1)
        batch["advantages"] = torch.nan_to_num(advantages, nan=0.0)

        # 3. One on-policy gradient step; then the mixture opponent may keep a snapshot of the new policy.
        metrics = online.update(exp, lambda micro, counts: nash_loss(
            online.model, micro, config, counts=counts, temperature=exp.temperature))
        opponent.after_step(online.model, step + 1)
        online.end_step(exp, metrics, advantages=batch["advantages"],
                        extra=lambda: {"opponent": opponent.state_dict()} if opponent.kind == "mixture" else {})
    return online.finish()
