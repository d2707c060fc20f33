"""PPO for language models, InstructGPT style (Ouyang et al. 2022): the four models of the seeds.

    policy π_θ (trained) · reference π_ref (frozen) · reward (a reward model folder or reward functions)
    · critic V_φ (trained: a separate value model, or a value head on the policy's body)

    for each step:
        sample completions o for B prompts q from π_old; score s = R(q, o)
        per-token reward  r_t = −β · KL_t(π_old ‖ π_ref)  (+ s at the last token)        (InstructGPT, eq. 2)
        δ_t = r_t + γ V(s_{t+1}) − V(s_t);  A_t = δ_t + γλ A_{t+1};  R_t = A_t + V(s_t)  (GAE, Schulman 2016)
        A ← whiten(A)
        for μ epochs, for each minibatch:
            L = −agg[min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t)] + c_v · agg[½ max((V − R)², (V_clip − R)²)] − c_H · H
        β ← KL controller (fixed, or adaptive toward a target KL, Ziegler et al. 2019)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tether import models
from tether.advantages import gae, kl_shaped_token_rewards
from tether.config import ConfigError
from tether.data.batching import split_micro_batches
from tether.losses import clipped_policy_loss, entropy_bonus, kl_estimate, value_loss
from tether.models import unwrap
from tether.models.value import RewardScorer, ValueHead, ValueModel, from_causal_lm, load_value_model
from tether.ops import masked_mean
from tether.recipes.online import (OnlineConfig, PromptStream, SampleWriter, Timer, UpdateStats, build_reference,
                                   build_sampler, check_strategy, completion_forward, critic_values, derive_seed,
                                   evaluate_rewards, explained_variance, final_evaluation, global_counts, global_mean,
                                   kl_metrics, linear_schedule, load_prompt_sets, make_kl_controller, masked_stats,
                                   minibatches, old_logprobs, rollout_metrics, rollout_tensors, sample_rollout,
                                   sampling_params, scoring_pass, take, total_steps, whiten)
from tether.rewards import RewardSet
from tether.runtime import distributed
from tether.runtime.grad_stats import policy_gradient_variance
from tether.runtime.optim import StepGuard
from tether.runtime.run import Run, autocast


@dataclass
class PPOConfig(OnlineConfig):
    """PPO with a critic and GAE: policy, frozen reference, reward model or functions, value model."""

    group_size: int = 1
    """Completions sampled per prompt (PPO needs no groups; >1 gives more completions per prompt)."""
    reward_model: str = ""
    """A reward model folder (from `tether rm`) scoring each completion; added to `rewards` with weight 1."""
    critic: Literal["separate", "shared"] = "separate"
    """separate: a value model of its own with its own optimizer (initialised from critic_model, or the
    policy's weights with a new head; trained in full even under LoRA); shared: a value head on the
    policy's body (one forward, less memory)."""
    critic_model: str = ""
    """Initial separate critic: a reward/value model folder (InstructGPT starts it from the reward model)
    or a causal LM; "" means the starting policy's weights with a fresh head."""
    gamma: float = 1.0
    """γ, discount of GAE."""
    lam: float = 0.95
    """λ, GAE's bias/variance trade-off (0: one-step TD, 1: Monte-Carlo returns)."""
    whiten_advantages: bool = True
    """Normalise the advantages to mean 0, std 1 over the batch's tokens."""
    value_coef: float = 0.1
    """c_v, weight of the value loss."""
    value_clip: float | None = 0.2
    """ε_v: new values are clipped to old ± ε_v in the value loss (null: no clipping)."""
    kl_coef: float = 0.05
    """β, weight of the per-token KL penalty in the reward (InstructGPT). 0 loads no reference."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimate in the reward: k1 = log π_old − log π_ref (InstructGPT), k2, k3."""
    ppo_epochs: int = 4
    """μ: update epochs over each step's rollouts."""

    def validate(self) -> None:
        super().validate()
        if not self.rewards and not self.reward_model:
            raise ConfigError("config key 'rewards': PPO needs a reward: set reward_model (a folder) or rewards "
                              "(e.g. [{name: math, weight: 1.0}])")
        if self.critic == "shared" and self.critic_model:
            raise ConfigError("config key 'critic_model': a shared critic is a head on the policy; leave "
                              "critic_model empty or set critic=separate")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError(f"config keys 'gamma', 'lam': must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.value_clip is not None and self.value_clip <= 0:
            raise ConfigError(f"config key 'value_clip': must be > 0 or null, got {self.value_clip}")


def build_critic(config: PPOConfig, policy, pad_id: int):
    """The critic V_φ: a ValueModel, or a ValueHead on the policy's last hidden states."""
    if config.critic == "shared":
        return ValueHead.for_model(policy)
    if config.critic_model:
        return load_value_model(config.critic_model, seed=config.seed)[0]
    body = unwrap(policy)
    body = body.get_base_model() if hasattr(body, "get_base_model") else body
    return ValueModel(from_causal_lm(body, pad_token_id=pad_id, seed=config.seed))


def critic_state(critic, optimizer, scheduler, guard) -> dict:
    return {"model": unwrap(critic).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "guard": guard.state_dict()}


def load_critic_state(state: dict, critic, optimizer, scheduler, guard) -> None:
    unwrap(critic).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    guard.load_state_dict(state["guard"])


def build_reward_set(config: PPOConfig, device) -> RewardSet:
    specs = list(config.rewards)
    if config.reward_model:
        scorer = RewardScorer(config.reward_model, device=device, chat_template=config.chat_template)

        def reward_model(prompts, completions, **columns):
            return scorer.score(prompts, completions)

        specs.append(reward_model)
    return RewardSet(specs)


def values_of(config: PPOConfig, model, critic, micro: dict):
    return (completion_forward(model, micro, value_head=critic)[2] if config.critic == "shared"
            else critic_values(critic, micro))


def ppo_loss(model, critic, micro: dict, config: PPOConfig, *, counts: dict, temperature: float):
    """This micro-batch's share of the minibatch loss (GLOBAL counts). Returns (loss, loss terms, metrics)."""
    shared = critic if config.critic == "shared" else None
    logprobs, entropy, values = completion_forward(model, micro, temperature=temperature, entropy=True,
                                                   entropy_grad=config.entropy_coef > 0, value_head=shared)
    if values is None:
        values = critic_values(critic, micro)  # (n, C)
    mask = micro["loss_mask"]  # (n, C)
    agg = dict(agg_mode=config.loss_aggregation, **counts)
    policy_loss, metrics = clipped_policy_loss(  # PPO clipped surrogate, Schulman et al. 2017, eq. 7
        logprobs, micro["old_logprobs"], micro["advantages"], mask, clip_low=config.clip_low,
        clip_high=config.clip_high, dual_clip=config.dual_clip, importance_level=config.importance_level, **agg)
    critic_loss, value_metrics = value_loss(values, micro["old_values"], micro["returns"], mask,
                                            clip=config.value_clip, **agg)
    loss = policy_loss + config.value_coef * critic_loss
    if config.entropy_coef > 0:
        bonus, _ = entropy_bonus(entropy, mask, coef=config.entropy_coef, **agg)
        loss = loss + bonus
    metrics.update(entropy=masked_mean(entropy, micro["completion_mask"]),
                   value_clip_frac=value_metrics["value_clip_frac"])
    return loss, {"loss": loss, "policy_loss": policy_loss, "value_loss": critic_loss}, metrics


def train(config: PPOConfig) -> Path:
    """Run PPO as configured; returns the `final/` policy folder (the critic is saved in `critic/`)."""
    run = Run(config)
    check_strategy(config)
    model, tokenizer = models.load(config.model, lora=config.lora, seed=config.seed)
    model.to(run.device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    reward_set = build_reward_set(config, run.device)
    prompts, eval_prompts = load_prompt_sets(config, tokenizer, reward_set)
    kl_controller = make_kl_controller(config)
    reference = build_reference(model, config.kl_needed())  # before run.start loads resumed weights
    critic = run.wrap(build_critic(config, model, tokenizer.pad_token_id).to(run.device))
    model = run.wrap(model)
    sampler = build_sampler(config, model, tokenizer)
    stream = PromptStream(len(prompts), config.seed)

    num_steps = total_steps(config, len(prompts))
    total_updates = num_steps * config.ppo_epochs * config.num_minibatches
    optimizer, scheduler = run.optimizer(model, total_updates)
    # The critic has its own optimizer and gradient clipping; its state travels in the checkpoint's extras.
    critic_optimizer, critic_scheduler = run.optimizer(critic, total_updates)
    critic_guard = StepGuard()
    start_step, extra = run.start(model, tokenizer, optimizer, scheduler, num_steps)
    if extra:
        stream.cursor = extra["prompt_cursor"]
        kl_controller.load_state_dict(extra["kl_controller"])
        load_critic_state(extra["critic"], critic, critic_optimizer, critic_scheduler, critic_guard)
    samples = SampleWriter(run.dir, config.sample_steps, start_step=start_step, enabled=run.main)
    schedule_steps = config.schedule_steps or num_steps

    model.train()
    critic.train()
    for step in range(start_step, num_steps):
        timer = Timer()
        group_size = round(linear_schedule(config.group_size, config.group_size_end, step, schedule_steps))
        temperature = linear_schedule(config.temperature, config.temperature_end, step, schedule_steps)
        beta = kl_controller.beta

        # 1. Rollout: completions for a batch of prompts, scored by the reward model / functions.
        rollout, sampled, sampling_metrics = sample_rollout(
            sampler, reward_set, prompts, stream, sampling_params(config, group_size, temperature),
            batch_size=config.batch_size, seed=config.seed, step=step, timer=timer,
            chunk_size=config.generation_batch_size)
        batch = rollout_tensors(rollout, tokenizer.pad_token_id, run.device, mask_truncated=config.mask_truncated)
        N = batch["input_ids"].shape[0]
        micro_size = config.micro_batch_size or N
        mask = batch["loss_mask"]  # (N, C)

        # 2. π_old, π_ref and V_old on every completion token, (N, C).
        with timer.section("old_logprobs"), autocast(run):
            batch["old_logprobs"] = old_logprobs(config, model, batch, micro_size, temperature)
        token_kl, kl = torch.zeros_like(batch["old_logprobs"]), {}
        if reference is not None:
            with timer.section("reference"), autocast(run):
                ref_logprobs = reference.logprobs(batch, micro_size, temperature)
            token_kl = kl_estimate(batch["old_logprobs"], ref_logprobs, config.kl_estimator)  # (N, C)
            kl = kl_metrics(batch["old_logprobs"], ref_logprobs, batch["completion_mask"], config.kl_estimator)
        with timer.section("values"), autocast(run):
            batch["old_values"] = scoring_pass(lambda micro: values_of(config, model, critic, micro), batch,
                                               micro_size)

        # 3. KL-penalised token rewards → GAE advantages and returns (unjudged completions carry no loss).
        scores = torch.nan_to_num(rollout.rewards.to(run.device))  # (N,)
        token_rewards = kl_shaped_token_rewards(scores, token_kl, batch["completion_mask"], beta=beta)  # (N, C)
        advantages, returns = gae(token_rewards, batch["old_values"], mask, gamma=config.gamma, lam=config.lam)
        adv_metrics = {**masked_stats(advantages, mask, "adv"), **masked_stats(returns, mask, "returns"),
                       "values_mean": global_mean(batch["old_values"], mask),
                       "explained_variance": explained_variance(batch["old_values"], returns, mask)}
        if config.whiten_advantages:
            advantages = whiten(advantages, mask)  # over the global batch
        batch["advantages"], batch["returns"] = advantages, returns
        grad_var = {}
        if config.log_grad_variance:  # the noise of the policy-gradient estimate (seed 003, exercise 15)
            with timer.section("grad_variance"), autocast(run):
                grad_var = policy_gradient_variance(
                    unwrap(model), lambda rows: completion_forward(unwrap(model), take(batch, rows),
                                                                   temperature=temperature)[0],
                    advantages, mask, micro_size)

        # 4. μ epochs over shuffled minibatches: clipped policy loss + value loss (− entropy bonus).
        stats = UpdateStats()
        with timer.section("update"):
            for epoch in range(config.ppo_epochs):
                for index in minibatches(N, config.num_minibatches, derive_seed(config.seed, step, epoch)):
                    counts = global_counts(batch, index, config.max_completion_length)
                    for micro_index in split_micro_batches(index, micro_size):
                        micro = take(batch, micro_index)
                        with autocast(run):
                            loss, terms, metrics = ppo_loss(model, critic, micro, config, counts=counts,
                                                            temperature=temperature)
                        (loss * distributed.world_size()).backward()
                        stats.add(terms, metrics, micro["loss_mask"].sum())
                    grad_norm, _ = run.guard.step(model, optimizer, scheduler, config.max_grad_norm)
                    critic_grad_norm, _ = critic_guard.step(critic, critic_optimizer, critic_scheduler,
                                                            config.max_grad_norm)
                    stats.optimizer_step(grad_norm)
                    stats.add({}, {"critic_grad_norm": critic_grad_norm}, 1.0)
        sampler.load_weights(model)
        kl_controller.update(kl.get("kl_ref_seq", 0.0), N * distributed.world_size())

        metrics = {**rollout_metrics(sampled, rollout, batch), **adv_metrics, **kl, **stats.reduce(),
                   **sampling_metrics, **grad_var, "kl_coef": beta, "temperature": temperature, **timer.metrics()}
        if eval_prompts and config.eval_steps and (step + 1) % config.eval_steps == 0:
            metrics.update(evaluate_rewards(sampler, reward_set, eval_prompts, config))
        samples.write(step + 1, rollout)
        run.end_step(step + 1, metrics, model=model, tokenizer=tokenizer, tokens=int(batch["attention_mask"].sum()),
                     extra=lambda: {"prompt_cursor": stream.cursor, "kl_controller": kl_controller.state_dict(),
                                    "critic": critic_state(critic, critic_optimizer, critic_scheduler,
                                                           critic_guard)})

    final_evaluation(run, sampler, reward_set, eval_prompts, config)
    if run.main and config.critic == "shared":
        unwrap(critic).save(run.dir / "critic")
    elif run.main:
        unwrap(critic).save_pretrained(run.dir / "critic", tokenizer)
    return run.finish(model, tokenizer)
