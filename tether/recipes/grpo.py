"""GRPO and its family with reward functions: Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE, REINFORCE++.

    for each step:
        sample G completions o_1..o_G for each of B prompts q from π_old; score them: r_i = Σ_k w_k R_k(q, o_i)
        A_i = (r_i − mean(r)) / std(r) within each group          (or another estimator, `advantage=`)
        for μ epochs, for each minibatch:
            L = −agg_t[ min(ρ_t A_i, clip(ρ_t, 1−ε_low, 1+ε_high) A_i) ] + β · agg_t[ KL_t(π_θ ‖ π_ref) ]
            ρ_t = π_θ(o_t | q, o_<t) / π_old(o_t | q, o_<t)                    (Shao et al. 2024, eq. 3)

RLOO and REINFORCE are this loop with `advantage: rloo | reinforce`; Dr. GRPO is `advantage: dr_grpo` with
`loss_aggregation: token_sum_norm`; DAPO adds `clip_high: 0.28`, `dynamic_sampling: true`,
`mask_truncated: true` or the `length` reward; GSPO is `importance_level: sequence`. See docs/online_rl.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tether.advantages import RunningMeanBaseline, get_advantage_estimator, kl_shaped_token_rewards
from tether.config.grpo import GRPOConfig
from tether.losses import (accepted_kwargs, clipped_policy_loss, entropy_bonus, kl_estimate,
                           masked_importance_weights, truncated_importance_weights)
from tether.models.forward import completion_forward
from tether.online import setup_online
from tether.ops import aggregate, masked_mean
from tether.runtime import distributed
from tether.runtime.run import Run


def grpo_loss(model, micro: dict, config: GRPOConfig, *, beta: float, counts: dict, temperature: float):
    """This micro-batch's share of the minibatch loss (divided by the minibatch's GLOBAL counts `counts`).

    Returns (loss, loss terms, metrics)."""
    logprobs, entropy, _ = completion_forward(model, micro, temperature=temperature, entropy=True,
                                              entropy_grad=config.entropy_coef > 0)  # (n, C), (n, C)
    mask = micro["loss_mask"]  # (n, C)
    agg = dict(agg_mode=config.loss_aggregation, **counts)
    # IS weights w ≥ 0 per token scale the advantage, which scales each token's clipped loss by w (TIS / MIS).
    advantages = micro["advantages"][:, None] * micro["is_weights"] if "is_weights" in micro else micro["advantages"]
    # Clipped surrogate with ε_low / ε_high (DAPO), dual clip, token or sequence ratio (GSPO).
    policy_loss, metrics = clipped_policy_loss(
        logprobs, micro["old_logprobs"], advantages, mask, clip_low=config.clip_low,
        clip_high=config.clip_high, dual_clip=config.dual_clip, importance_level=config.importance_level, **agg)
    loss, terms = policy_loss, {"policy_loss": policy_loss}
    if beta > 0 and config.kl_penalty == "loss":
        kl = kl_estimate(logprobs, micro["ref_logprobs"], config.kl_estimator)  # (n, C)
        kl_loss = aggregate(kl, mask, config.loss_aggregation, **counts)
        loss = loss + beta * kl_loss  # GRPO objective, Shao et al. 2024, eq. 3: − β D_KL[π_θ ‖ π_ref]
        terms["kl_loss"] = kl_loss
    if config.entropy_coef > 0:
        bonus, _ = entropy_bonus(entropy, mask, coef=config.entropy_coef, **agg)
        loss = loss + bonus
    metrics["entropy"] = masked_mean(entropy, micro["completion_mask"])
    return loss, {"loss": loss, **terms}, metrics


def train(config: GRPOConfig) -> Path:
    """Run GRPO (or a family member) as configured; returns the `final/` model folder."""
    online = setup_online(Run(config), config)
    estimator = get_advantage_estimator(config.advantage)
    with_baseline = config.advantage == "reinforce" and config.reinforce_baseline
    baseline = RunningMeanBaseline(config.baseline_decay) if with_baseline else None
    extra = online.start()
    if extra and baseline is not None:
        baseline.load_state_dict(extra["baseline"])

    for step in online.steps():
        # 1-2. Rollout: G completions per prompt, scored (DAPO: refill flat groups); π_old, π_ref log-probs (N, C).
        exp = online.experience(step, dynamic_sampling=config.dynamic_sampling, max_tries=config.max_sampling_tries)
        batch = exp.batch
        exp.metrics.update(importance_weights(config, batch))  # batch["is_weights"] unless is_correction=none

        # 3. Advantages from the rewards of each group (NaN = could not judge: advantage 0, no loss).
        rewards = exp.rollout.rewards.to(online.run.device)  # (N,)
        if "ref_logprobs" in batch and config.kl_penalty == "reward":
            token_kl = kl_estimate(batch["old_logprobs"], batch["ref_logprobs"], config.kl_estimator)  # (N, C)
            rewards = kl_shaped_token_rewards(rewards, token_kl, batch["completion_mask"], beta=exp.beta).sum(-1)
        # Over the global batch: group estimators see whole groups either way, batch-wide ones need every rank.
        all_rewards = distributed.all_gather_cat(rewards)  # (world × N,)
        advantages, adv_metrics = estimator(all_rewards, exp.group_size, **accepted_kwargs(
            estimator, std=config.advantage_std, baseline=baseline.value if baseline else 0.0))
        if baseline is not None:
            baseline.update(all_rewards)
        batch["advantages"] = distributed.own_rows(advantages)  # (N,)

        # 4. μ epochs over shuffled minibatches; each minibatch is one optimizer step.
        update_metrics = online.update(exp, lambda micro, counts: grpo_loss(
            online.model, micro, config, beta=exp.beta, counts=counts, temperature=exp.temperature))
        online.end_step(exp, {**adv_metrics, **update_metrics}, advantages=batch["advantages"],
                        extra=lambda: {"baseline": baseline.state_dict() if baseline else None})
    return online.finish()


def importance_weights(config: GRPOConfig, batch: dict) -> dict:
    """TIS / masked-IS weights π_old/π_engine into batch["is_weights"] (N, C), and the engine-vs-trainer gap
    metrics (mean |Δ log p|, KL, clip or mask fraction). Nothing when the engine's log-probs are π_old's."""
    if batch["old_logprobs"] is batch["sampling_logprobs"]:
        return {}
    args = batch["old_logprobs"], batch["sampling_logprobs"], batch["completion_mask"]
    if config.is_correction == "mis":
        weights, metrics = masked_importance_weights(*args, low=config.is_low, high=config.is_cap,
                                                     level=config.is_level)
    else:
        weights, metrics = truncated_importance_weights(*args, cap=config.is_cap)
    if config.is_correction != "none":
        batch["is_weights"] = weights
    return {name: float(value) for name, value in metrics.items()}
