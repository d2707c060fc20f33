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
from typing import Literal

from tether import models
from tether.advantages import RunningMeanBaseline, get_advantage_estimator
from tether.config import ConfigError
from tether.data.batching import split_micro_batches
from tether.losses import clipped_policy_loss, entropy_bonus, kl_estimate
from tether.ops import aggregate, masked_mean
from tether.recipes.online import (OnlineConfig, PromptStream, SampleWriter, Timer, UpdateStats, build_reference,
                                   build_sampler, check_strategy, completion_forward, derive_seed, evaluate_rewards,
                                   final_evaluation, global_counts, kl_metrics, linear_schedule, load_prompt_sets,
                                   make_kl_controller, minibatches, old_logprobs, own_rows, rollout_metrics,
                                   rollout_tensors, sample_rollout, sampling_params, take, total_steps)
from tether.rewards import RewardSet
from tether.runtime import distributed
from tether.runtime.run import Run, autocast

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")  # need G >= 2 completions per prompt


@dataclass
class GRPOConfig(OnlineConfig):
    """Group-relative policy optimization with reward functions (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE)."""

    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce", "reinforce_pp", "reinforce_pp_baseline"] = "grpo"
    """Advantage estimator: grpo (r − mean)/std in the group; dr_grpo r − mean; rloo leave-one-out mean;
    reinforce r − running mean; reinforce_pp batch-normalised r; reinforce_pp_baseline group mean, batch std."""
    advantage_std: Literal["population", "sample"] = "population"
    """Group std of grpo: population (÷G) or sample (÷(G−1), as TRL and verl)."""
    baseline_decay: float = 0.9
    """reinforce: decay of the running-mean reward baseline."""
    kl_penalty: Literal["loss", "reward"] = "loss"
    """How β·KL enters: loss = a loss term (GRPO); reward = subtracted from each completion's reward as
    β·Σ_t KL_t before the advantages (the estimator in `kl_estimator`)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal and sample more prompts to refill."""
    max_sampling_tries: int = 4
    """Rounds of sampling per step under dynamic_sampling; a batch still short is filled with dropped groups."""

    def validate(self) -> None:
        super().validate()
        if not self.rewards and not self.env:
            raise ConfigError("config key 'rewards': GRPO needs at least one reward function, "
                              "e.g. rewards: [{name: math, weight: 1.0}] (or an `env` that gives rewards)")
        smallest_group = min(self.group_size, self.group_size_end or self.group_size)
        if self.advantage in GROUP_ESTIMATORS and smallest_group < 2:
            raise ConfigError(f"config key 'group_size': advantage={self.advantage} compares completions of the "
                              f"same prompt and needs group_size >= 2, got {smallest_group}")
        if self.dynamic_sampling and smallest_group < 2:
            raise ConfigError("config key 'dynamic_sampling': needs group_size >= 2")
        if self.max_sampling_tries < 1:
            raise ConfigError(f"config key 'max_sampling_tries': must be >= 1, got {self.max_sampling_tries}")


def grpo_loss(model, micro: dict, config: GRPOConfig, *, beta: float, counts: dict, temperature: float):
    """This micro-batch's share of the minibatch loss (divided by the minibatch's GLOBAL counts `counts`).

    Returns (loss, loss terms, metrics)."""
    logprobs, entropy, _ = completion_forward(model, micro, temperature=temperature, entropy=True,
                                              entropy_grad=config.entropy_coef > 0)  # (n, C), (n, C)
    mask = micro["loss_mask"]  # (n, C)
    agg = dict(agg_mode=config.loss_aggregation, **counts)
    # Clipped surrogate with ε_low / ε_high (DAPO), dual clip, token or sequence ratio (GSPO).
    policy_loss, metrics = clipped_policy_loss(
        logprobs, micro["old_logprobs"], micro["advantages"], mask, clip_low=config.clip_low,
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
    run = Run(config)
    check_strategy(config)
    model, tokenizer = models.load(config.model, lora=config.lora, seed=config.seed)
    model.to(run.device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    reward_set = RewardSet(config.rewards) if config.rewards else None  # None: the env's rewards only
    prompts, eval_prompts = load_prompt_sets(config, tokenizer, reward_set)
    estimator = get_advantage_estimator(config.advantage)
    baseline = RunningMeanBaseline(config.baseline_decay) if config.advantage == "reinforce" else None
    kl_controller = make_kl_controller(config)
    reference = build_reference(model, config.kl_needed())  # before run.start loads resumed weights
    model = run.wrap(model)  # DDP / FSDP2 under torchrun
    sampler = build_sampler(config, model, tokenizer)
    stream = PromptStream(len(prompts), config.seed)
    episodes = config.episodes()  # multi-turn rollouts with an environment, or None

    num_steps = total_steps(config, len(prompts))
    optimizer, scheduler = run.optimizer(model, num_steps * config.ppo_epochs * config.num_minibatches)
    start_step, extra = run.start(model, tokenizer, optimizer, scheduler, num_steps)
    if extra:
        stream.cursor = extra["prompt_cursor"]
        kl_controller.load_state_dict(extra["kl_controller"])
        if baseline is not None:
            baseline.load_state_dict(extra["baseline"])
    samples = SampleWriter(run.dir, config.sample_steps, start_step=start_step, enabled=run.main)
    schedule_steps = config.schedule_steps or num_steps

    model.train()
    for step in range(start_step, num_steps):
        timer = Timer()
        group_size = round(linear_schedule(config.group_size, config.group_size_end, step, schedule_steps))
        temperature = linear_schedule(config.temperature, config.temperature_end, step, schedule_steps)
        beta = kl_controller.beta

        # 1. Rollout: G completions per prompt, scored by the reward functions (DAPO: refill flat groups).
        rollout, sampled, sampling_metrics = sample_rollout(
            sampler, reward_set, prompts, stream, sampling_params(config, group_size, temperature),
            batch_size=config.batch_size, seed=config.seed, step=step, timer=timer,
            chunk_size=config.generation_batch_size,
            dynamic_sampling=config.dynamic_sampling, max_tries=config.max_sampling_tries, episodes=episodes)
        batch = rollout_tensors(rollout, tokenizer.pad_token_id, run.device, mask_truncated=config.mask_truncated)
        N = batch["input_ids"].shape[0]
        micro_size = config.micro_batch_size or N

        # 2. π_old and π_ref log-probs of every completion token, (N, C).
        with timer.section("old_logprobs"), autocast(run):
            batch["old_logprobs"] = old_logprobs(config, model, batch, micro_size, temperature)
        kl = {}
        if reference is not None:
            with timer.section("reference"), autocast(run):
                batch["ref_logprobs"] = reference.logprobs(batch, micro_size, temperature)
            kl = kl_metrics(batch["old_logprobs"], batch["ref_logprobs"], batch["completion_mask"],
                            config.kl_estimator)

        # 3. Advantages from the rewards of each group (NaN = could not judge: advantage 0, no loss).
        rewards = rollout.rewards.to(run.device)  # (N,)
        if reference is not None and config.kl_penalty == "reward":
            token_kl = kl_estimate(batch["old_logprobs"], batch["ref_logprobs"], config.kl_estimator)  # (N, C)
            rewards = rewards - beta * (token_kl * batch["completion_mask"]).sum(-1)  # r − β Σ_t KL_t
        # Over the global batch: group estimators see whole groups either way, batch-wide ones need every rank.
        all_rewards = distributed.all_gather_cat(rewards)  # (world × N,)
        advantages, adv_metrics = estimator(all_rewards, group_size, std=config.advantage_std,
                                            baseline=baseline.value if baseline else 0.0)
        if baseline is not None:
            baseline.update(all_rewards)
        batch["advantages"] = own_rows(advantages)  # (N,)

        # 4. μ epochs over shuffled minibatches; each minibatch is one optimizer step.
        stats = UpdateStats()
        with timer.section("update"):
            for epoch in range(config.ppo_epochs):
                for index in minibatches(N, config.num_minibatches, derive_seed(config.seed, step, epoch)):
                    counts = global_counts(batch, index, config.max_completion_length)
                    for micro_index in split_micro_batches(index, micro_size):
                        micro = take(batch, micro_index)
                        with autocast(run):
                            loss, terms, metrics = grpo_loss(model, micro, config, beta=beta, counts=counts,
                                                             temperature=temperature)
                        # Each rank's loss is its share of the global mean; DDP averages gradients over ranks.
                        (loss * distributed.world_size()).backward()
                        stats.add(terms, metrics, micro["loss_mask"].sum())
                    grad_norm, _ = run.guard.step(model, optimizer, scheduler, config.max_grad_norm)
                    stats.optimizer_step(grad_norm)
        sampler.load_weights(model)
        kl_controller.update(kl.get("kl_ref_seq", 0.0), N * distributed.world_size())

        metrics = {**adv_metrics, **rollout_metrics(sampled, rollout, batch), **kl, **stats.reduce(),
                   **sampling_metrics, "kl_coef": beta, "temperature": temperature, **timer.metrics()}
        if eval_prompts and config.eval_steps and (step + 1) % config.eval_steps == 0:
            metrics.update(evaluate_rewards(sampler, reward_set, eval_prompts, config))
        samples.write(step + 1, rollout, batch["advantages"])
        run.end_step(step + 1, metrics, model=model, tokenizer=tokenizer, tokens=int(batch["attention_mask"].sum()),
                     extra=lambda: {"prompt_cursor": stream.cursor, "kl_controller": kl_controller.state_dict(),
                                    "baseline": baseline.state_dict() if baseline else None})

    final_evaluation(run, sampler, reward_set, eval_prompts, config)
    return run.finish(model, tokenizer)
