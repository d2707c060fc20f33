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

import torch

from tether.advantages import gae, kl_shaped_token_rewards
from tether.config.ppo import PPOConfig
from tether.losses import clipped_policy_loss, entropy_bonus, kl_estimate, value_loss
from tether.models import unwrap
from tether.models.forward import completion_forward, critic_values, scoring_pass
from tether.models.value import RewardScorer, ValueHead, ValueModel, from_causal_lm, load_value_model
from tether.online import reward_specs, setup_online
from tether.ops import masked_mean
from tether.rewards import RewardSet
from tether.runtime.distributed import explained_variance, global_mean, masked_stats, whiten
from tether.runtime.optim import StepGuard
from tether.runtime.run import Run, autocast


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
    specs = reward_specs(config)
    if config.reward_model:
        scorer = RewardScorer(config.reward_model, device=device, chat_template=config.chat_template)

        def reward_model(prompts, completions, **columns):
            return scorer.score(prompts, completions)

        specs.append(reward_model)
    return RewardSet(specs)


def values_of(config: PPOConfig, model, critic, micro: dict):
    return (completion_forward(model, micro, value_head=critic, packing=config.padding_free)[2] if config.critic == "shared"
            else critic_values(critic, micro))


def ppo_loss(model, critic, micro: dict, config: PPOConfig, *, counts: dict, temperature: float):
    """This micro-batch's share of the minibatch loss (GLOBAL counts). Returns (loss, loss terms, metrics)."""
    shared = critic if config.critic == "shared" else None
    logprobs, entropy, values = completion_forward(model, micro, temperature=temperature, entropy=True,
                                                   entropy_grad=config.entropy_coef > 0, value_head=shared,
                                                   packing=config.padding_free)
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
    online = setup_online(run, config, reward_set=build_reward_set(config, run.device))
    model, tokenizer = online.model, online.tokenizer
    critic = run.wrap(build_critic(config, unwrap(model), tokenizer.pad_token_id).to(run.device))
    # The critic has its own optimizer and gradient clipping; its state travels in the checkpoint's extras.
    critic_optimizer, critic_scheduler = run.optimizer(critic, online.total_updates)
    critic_guard = StepGuard()
    extra = online.start()
    if extra:
        load_critic_state(extra["critic"], critic, critic_optimizer, critic_scheduler, critic_guard)
    critic.train()

    def critic_step() -> dict:
        grad_norm, _ = critic_guard.step(critic, critic_optimizer, critic_scheduler, config.max_grad_norm)
        return {"critic_grad_norm": grad_norm}

    for step in online.steps():
        # 1-2. Rollout: completions for a batch of prompts, scored; π_old, π_ref and V_old per token, (N, C).
        exp = online.experience(step)
        batch, mask = exp.batch, exp.batch["loss_mask"]  # (N, C)
        with exp.timer.section("values"), autocast(run):
            batch["old_values"] = scoring_pass(lambda micro: values_of(config, model, critic, micro), batch,
                                               exp.micro_size)

        # 3. KL-penalised token rewards → GAE advantages and returns (unjudged completions carry no loss).
        token_kl = (kl_estimate(batch["old_logprobs"], batch["ref_logprobs"], config.kl_estimator)
                    if "ref_logprobs" in batch else torch.zeros_like(batch["old_logprobs"]))  # (N, C)
        scores = torch.nan_to_num(exp.rollout.rewards.to(run.device))  # (N,)
        token_rewards = kl_shaped_token_rewards(scores, token_kl, batch["completion_mask"], beta=exp.beta)  # (N, C)
        advantages, returns = gae(token_rewards, batch["old_values"], mask, gamma=config.gamma, lam=config.lam)
        adv_metrics = {**masked_stats(advantages, mask, "adv"), **masked_stats(returns, mask, "returns"),
                       "values_mean": global_mean(batch["old_values"], mask),
                       "explained_variance": explained_variance(batch["old_values"], returns, mask)}
        if config.whiten_advantages:
            advantages = whiten(advantages, mask)  # over the global batch
        batch["advantages"], batch["returns"] = advantages, returns

        # 4. μ epochs over shuffled minibatches: clipped policy loss + value loss (− entropy bonus).
        update_metrics = online.update(exp, lambda micro, counts: ppo_loss(
            model, critic, micro, config, counts=counts, temperature=exp.temperature),
            after_optimizer_step=critic_step)
        online.end_step(exp, {**adv_metrics, **update_metrics}, extra=lambda: {
            "critic": critic_state(critic, critic_optimizer, critic_scheduler, critic_guard)})

    if run.main and config.critic == "shared":
        unwrap(critic).save(run.dir / "critic")
    elif run.main:
        unwrap(critic).save_pretrained(run.dir / "critic", tokenizer)
    return online.finish()
