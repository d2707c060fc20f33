"""The online-RL core that grpo and ppo (and any new online recipe) share: set-up, one step's experience,
the minibatch update, metrics and evaluation. A recipe adds only its advantage and loss steps:

    online = setup_online(run, config)                  # policy, π_ref, sampler, reward set, prompts, optimizer
    online.start()                                      # resume: weights, optimizer, prompt cursor, β
    for step in online.steps():
        exp = online.experience(step)                   # rollout → tensors → π_old and π_ref log-probs, (N, C)
        exp.batch["advantages"] = ...                   # the recipe's estimator
        metrics = online.update(exp, loss_fn)           # μ epochs × minibatches × micro-batches
        online.end_step(exp, metrics)                   # sync the sampler, β, eval, samples.jsonl, checkpoint
    return online.finish()

The rollout types live in `tether.rollout`, the forward in `tether.models.forward`, the statistics over
ranks in `tether.runtime.distributed`, the formulas in `tether.losses` and `tether.advantages`.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from tether.config import ConfigError
from tether.config.online import OnlineConfig
from tether.data.batching import derive_seed, split_micro_batches
from tether.envs import env as env_reward, get_env
from tether.kl_control import AdaptiveKLController, FixedKLController
from tether.losses import kl_estimate, sequence_kl
from tether.models import unwrap
from tether.models.forward import completion_forward, logprob_fn, scoring_pass, take
from tether.models.reference import Reference
from tether.rewards import RewardResult, RewardSet
from tether.rollout import SamplingParams, get_sampler
from tether.rollout.episodes import EpisodeBatch, EpisodeOptions
from tether.rollout.async_queue import RolloutQueue
from tether.rollout.params import sampling_params as params_from_keys
from tether.rollout.prompts import Prompt, PromptStream, load_prompt_sets
from tether.rollout.rollout import Rollout, generate_and_score, rollout_tensors, sample_rollout
from tether.runtime import distributed
from tether.runtime.distributed import global_mean
from tether.runtime.grad_stats import policy_gradient_variance
from tether.runtime.logger import SampleWriter
from tether.runtime.metrics import Timer, UpdateStats
from tether.runtime.run import Run, autocast

log = logging.getLogger("tether")

LossFn = Callable[[dict, dict], tuple]
"""`loss_fn(micro, counts) -> (loss, loss terms, metrics)`: a micro-batch's share of its minibatch's loss,
divided by the minibatch's GLOBAL counts (`global_counts`)."""


@dataclass
class Experience:
    """One step's rollout as tensors, with the π_old (and π_ref) log-probs and the step's settings."""

    step: int
    rollout: Rollout
    """The groups trained on (rows of `batch`, group by group)."""
    sampled: Rollout
    """Everything sampled this step (more than `rollout` under dynamic sampling): the reward metrics."""
    batch: dict
    """(N, ...) tensors: `rollout_tensors`, `old_logprobs` (N, C) and, with a reference, `ref_logprobs` (N, C)."""
    group_size: int
    temperature: float
    beta: float
    micro_size: int
    timer: Timer
    metrics: dict = field(default_factory=dict)
    """Sampling and KL metrics of the step."""
    staleness: int = 0
    """Optimizer updates between the weights that sampled the rollout and the trained ones (async_rollouts)."""

    @property
    def size(self) -> int:
        """N, this rank's completions."""
        return self.batch["input_ids"].shape[0]


@dataclass
class OnlineRun:
    """What an online recipe trains with, built by `setup_online`; its methods are the loop's shared steps."""

    run: Run
    config: OnlineConfig
    model: torch.nn.Module
    tokenizer: object
    reward_set: RewardSet
    prompts: list[Prompt]
    eval_prompts: list[Prompt]
    reference: Reference | None
    sampler: object
    stream: PromptStream
    kl_controller: object
    num_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    start_step: int = 0
    samples: SampleWriter | None = None
    sampling_policy: torch.nn.Module | None = None
    """async_rollouts with the built-in engine: the copy of the policy the sampler reads, synced at each push."""
    rollouts: RolloutQueue | None = None
    """Made by the first `experience` call: runs `sample` for every step, up to async_rollouts steps ahead."""
    generate: Callable[..., Rollout] = generate_and_score
    """`generate(sampler, reward_set, prompts, params, timer) -> Rollout`: samples and scores a chunk of
    prompts, in training and evaluation (a recipe's own rollout, e.g. Nash-MD's, also samples opponents)."""

    @property
    def total_updates(self) -> int:
        """Optimizer steps of the run: ppo_epochs × num_minibatches per step."""
        return self.num_steps * self.config.ppo_epochs * self.config.num_minibatches

    def start(self) -> dict:
        """Resume from the latest checkpoint if any (weights, optimizer, prompt cursor, β); returns the
        checkpoint's extras ({} on a fresh run) for the recipe's own state."""
        self.start_step, extra = self.run.start(self.model, self.tokenizer, self.optimizer, self.scheduler,
                                                self.num_steps)
        if extra:
            self.stream.cursor = extra["prompt_cursor"]
            self.kl_controller.load_state_dict(extra["kl_controller"])
            self.reward_set.load_state_dict(extra.get("reward_stats"))
        if self.sampling_policy is not None:  # resumed weights into the async sampler's copy
            self.sampling_policy.load_state_dict(unwrap(self.model).state_dict())
        self.samples = SampleWriter(self.run.dir, self.config.sample_steps, start_step=self.start_step,
                                    enabled=self.run.main)
        self.model.train()
        return extra or {}

    def steps(self) -> range:
        return range(self.start_step, self.num_steps)

    def sample(self, step: int, *, dynamic_sampling: bool = False, max_tries: int = 1) -> tuple:
        """The experience producer: sample and score step `step`'s rollout (G per prompt; DAPO's dynamic
        sampling if asked). Returns (rollout, sampled, metrics, timer, group_size, temperature). Under
        async_rollouts it runs on the RolloutQueue's thread, ahead of the trainer."""
        config, timer = self.config, Timer()
        schedule_steps = config.schedule_steps or self.num_steps
        group_size = round(linear_schedule(config.group_size, config.group_size_end, step, schedule_steps))
        temperature = linear_schedule(config.temperature, config.temperature_end, step, schedule_steps)
        rollout, sampled, metrics = sample_rollout(
            self.sampler, self.reward_set, self.prompts, self.stream, sampling_params(config, group_size, temperature),
            batch_size=config.batch_size, seed=config.seed, step=step, timer=timer,
            chunk_size=config.generation_batch_size, dynamic_sampling=dynamic_sampling, max_tries=max_tries,
            generate=self.generate)
        return rollout, sampled, metrics, timer, group_size, temperature

    def experience(self, step: int, *, dynamic_sampling: bool = False, max_tries: int = 1) -> Experience:
        """This step's rollout from the queue (`sample`, run now or, under async_rollouts, ahead of time) as
        tensors, with π_old and π_ref read at every completion token."""
        config, run = self.config, self.run
        if self.rollouts is None:
            self.rollouts = RolloutQueue(lambda s: self.sample(s, dynamic_sampling=dynamic_sampling,
                                                               max_tries=max_tries),
                                         ahead=config.async_rollouts, start=step, stop=self.num_steps)
        queued = self.rollouts.get()  # synchronous (async_rollouts=0): sampled now, from the latest weights
        assert queued.step == step, (queued.step, step)
        rollout, sampled, metrics, timer, group_size, temperature = queued.rollout
        batch = rollout_tensors(rollout, self.tokenizer.pad_token_id, run.device, mask_truncated=config.mask_truncated)
        micro_size = config.micro_batch_size or batch["input_ids"].shape[0]
        with timer.section("old_logprobs"), autocast(run):
            batch["old_logprobs"] = old_logprobs(config, self.model, batch, micro_size, temperature)
        if self.reference is not None:
            with timer.section("reference"), autocast(run):
                batch["ref_logprobs"] = self.reference.logprobs(batch, micro_size, temperature,
                                                                packing=config.padding_free)
            metrics.update(kl_metrics(batch["old_logprobs"], batch["ref_logprobs"], batch["completion_mask"],
                                      config.kl_estimator))
        return Experience(step, rollout, sampled, batch, group_size, temperature, self.kl_controller.beta,
                          micro_size, timer, metrics, staleness=queued.staleness)

    def update(self, exp: Experience, loss_fn: LossFn, *, after_optimizer_step: Callable[[], dict] | None = None
               ) -> dict:
        """μ = ppo_epochs passes over the step's rows in shuffled minibatches, one optimizer step each, every
        minibatch in micro-batches of `micro_batch_size`. `after_optimizer_step()` (e.g. the critic's step)
        runs after each policy step and returns metrics. Returns the update's metrics (`UpdateStats`)."""
        config, stats, grad_var = self.config, UpdateStats(), {}
        if config.log_grad_variance:  # the noise of the policy-gradient estimate (seed 003, exercise 15)
            with exp.timer.section("grad_variance"), autocast(self.run):
                policy = unwrap(self.model)
                grad_var = policy_gradient_variance(
                    policy, lambda rows: completion_forward(policy, take(exp.batch, rows), temperature=exp.temperature,
                                                            packing=config.padding_free)[0],
                    exp.batch["advantages"], exp.batch["loss_mask"], exp.micro_size)
        with exp.timer.section("update"):
            for epoch in range(config.ppo_epochs):
                for index in minibatches(exp.size, config.num_minibatches, derive_seed(config.seed, exp.step, epoch)):
                    counts = global_counts(exp.batch, index, config.max_completion_length)
                    for micro_index in split_micro_batches(index, exp.micro_size):
                        micro = take(exp.batch, micro_index)
                        with autocast(self.run):
                            loss, terms, metrics = loss_fn(micro, counts)
                        # Each rank's loss is its share of the global mean; DDP averages gradients over ranks.
                        (loss * distributed.world_size()).backward()
                        stats.add(terms, metrics, micro["loss_mask"].sum())
                    grad_norm, _ = self.run.guard.step(self.model, self.optimizer, self.scheduler, config.max_grad_norm)
                    stats.optimizer_step(grad_norm)
                    if after_optimizer_step is not None:
                        stats.add({}, after_optimizer_step(), 1.0)
        return {**stats.reduce(), **grad_var}

    def end_step(self, exp: Experience, metrics: dict, *, advantages: Tensor | None = None,
                 extra: Callable[[], dict] | None = None) -> None:
        """After the update: the sampler takes the new weights, β its controller step; log the step's
        metrics (with the held-out rewards every eval_steps), write samples.jsonl and maybe a checkpoint
        whose extras hold the prompt cursor, β and the recipe's `extra()`."""
        config, step = self.config, exp.step + 1
        self.rollouts.push_weights(self.push_weights)  # between two batches of the worker, if any
        self.kl_controller.update(exp.metrics.get("kl_ref_seq", 0.0), exp.size * distributed.world_size())
        metrics = {**metrics, **rollout_metrics(exp.sampled, exp.rollout, exp.batch), **exp.metrics,
                   "kl_coef": exp.beta, "temperature": exp.temperature, **exp.timer.metrics(),
                   "staleness": float(exp.staleness)}
        if self.eval_prompts and config.eval_steps and step % config.eval_steps == 0:
            with self.rollouts.lock:  # not while the worker samples
                metrics.update(evaluate_rewards(self.sampler, self.reward_set, self.eval_prompts, config,
                                                self.generate))
        self.samples.write(step, exp.rollout, advantages)
        self.run.end_step(step, metrics, model=self.model, tokenizer=self.tokenizer,
                          tokens=int(exp.batch["attention_mask"].sum()),
                          extra=lambda: {"prompt_cursor": self.stream.cursor,
                                         "kl_controller": self.kl_controller.state_dict(),
                                         "reward_stats": self.reward_set.state_dict(),
                                         **(extra() if extra is not None else {})})

    def push_weights(self) -> None:
        """The sampler takes the policy's current weights (through its copy, for the async built-in engine)."""
        if self.sampling_policy is not None:
            self.sampling_policy.load_state_dict(unwrap(self.model).state_dict())
        self.sampler.load_weights(self.model)

    def finish(self) -> Path:
        """Held-out rewards (eval.json), then `final/`; returns its path."""
        if self.rollouts is not None:
            self.rollouts.close()
        final_evaluation(self.run, self.sampler, self.reward_set, self.eval_prompts, self.config, self.generate)
        return self.run.finish(self.model, self.tokenizer)


def setup_online(run: Run, config: OnlineConfig, *, reward_set: RewardSet | None = None) -> OnlineRun:
    """Everything an online recipe trains with: the policy (on the run's device, wrapped for DDP), the frozen
    reference (None at β = 0), the sampler, the reward set (`config.rewards` unless given), the training and
    held-out prompts (rows checked by the reward set now), the prompt stream, the KL controller, the
    optimizer and scheduler. Call `OnlineRun.start()` once the recipe's own modules exist (and set
    `OnlineRun.generate` for a rollout of its own)."""
    check_strategy(config)
    model, tokenizer = run.load_model()
    reward_set = RewardSet(reward_specs(config)) if reward_set is None else reward_set
    prompts, eval_prompts = load_prompt_sets(config, tokenizer, reward_set)
    reference = build_reference(model, config.kl_needed())  # before run.start loads resumed weights
    model = run.wrap(model)  # DDP under torchrun
    num_steps = total_steps(config, len(prompts))
    # Async rollouts: the built-in engine samples from a copy of the policy while the trainer changes it.
    sampling_policy = copy.deepcopy(unwrap(model)) if config.async_rollouts and config.rollout_engine == "builtin" \
        else None
    online = OnlineRun(run, config, model, tokenizer, reward_set, prompts, eval_prompts, reference,
                       build_sampler(config, sampling_policy or model, tokenizer), PromptStream(len(prompts), config.seed),
                       make_kl_controller(config), num_steps, None, None, sampling_policy=sampling_policy)
    if config.env:  # episodes: one more rollout type; the loss mask is their model-written mask
        online.generate = functools.partial(generate_and_score, episodes=episode_options(config))
    online.optimizer, online.scheduler = run.optimizer(model, online.total_updates)
    return online


def reward_specs(config: OnlineConfig) -> list:
    """The run's reward functions: `rewards`, plus the environment's own reward (`env`, weight 1) with `env`."""
    return [*config.rewards, {"name": env_reward, "weight": 1.0}] if config.env else list(config.rewards)


def episode_options(config: OnlineConfig) -> EpisodeOptions | None:
    """How to roll out episodes with `config.env`, or None for single completions."""
    if not config.env:
        return None
    return EpisodeOptions(get_env(config.env, **config.env_options), config.max_turns, config.max_turn_tokens)


def linear_schedule(start: float, end: float | None, step: int, steps: int) -> float:
    """start → end linearly over `steps` steps, then end; `end=None` means constant."""
    if end is None or steps <= 0:
        return start
    return start + (end - start) * min(step / steps, 1.0)


def make_kl_controller(config: OnlineConfig):
    if config.kl_controller == "fixed":
        return FixedKLController(config.kl_coef)
    mode = config.kl_controller.removeprefix("adaptive_")
    return AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon, mode=mode)


def build_reference(policy, needed: bool) -> Reference | None:
    """The reference, or None (no copy, no forward) when β = 0."""
    return Reference.from_policy(policy) if needed else None


def old_logprobs(config: OnlineConfig, model, batch: dict, micro_size: int, temperature: float) -> Tensor:
    """π_old log-probs (N, C). The sampler's are π_old when it sampled from these weights at this temperature
    with the training forward's numerics (the built-in engine); otherwise one no-grad forward."""
    on_policy = config.ppo_epochs == 1 and config.num_minibatches == 1 and config.rollout_engine == "builtin" \
        and not config.async_rollouts  # async rollouts sample with older weights
    if config.old_logprobs == "sampler" or (config.old_logprobs == "auto" and on_policy):
        return batch["sampling_logprobs"]
    return scoring_pass(logprob_fn(model, temperature, packing=config.padding_free), batch, micro_size)


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


def kl_metrics(old_logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str) -> dict:
    """kl_ref: mean per-token KL estimate of π_old from π_ref; kl_ref_seq: mean over completions of the
    summed k1 (the completion's KL, what the adaptive controllers steer). Over the global batch."""
    token_kl = kl_estimate(old_logprobs, ref_logprobs, estimator)  # (N, C)
    return {"kl_ref": global_mean(token_kl, mask), "kl_ref_seq": global_mean(sequence_kl(old_logprobs, ref_logprobs,
                                                                                           mask))}


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
    if isinstance(batch.samples, EpisodeBatch):  # turns, tool calls, tool errors, tool time (this rank's)
        metrics.update(batch.samples.metrics())
    return metrics


def check_strategy(config) -> None:
    """Online RL samples with each rank's own prompts, so ranks decode different numbers of steps: FSDP, whose
    forwards are collectives, would hang. DDP replicas sample independently."""
    if distributed.world_size() > 1 and config.distributed.strategy == "fsdp":
        raise ConfigError("config key 'distributed.strategy': online RL recipes support ddp only (each rank samples "
                          "its own prompts, which FSDP's collective forwards cannot follow)")


@torch.no_grad()
def evaluate_rewards(sampler, reward_set, prompts: list[Prompt], config: OnlineConfig,
                     generate: Callable[..., Rollout] = generate_and_score) -> dict[str, float]:
    """Mean rewards of one completion per held-out prompt (greedy at eval_temperature 0)."""
    params = SamplingParams(temperature=config.eval_temperature, max_new_tokens=config.max_completion_length,
                            stop=config.stop, seed=config.seed, n=1)
    rollout = generate(sampler, reward_set, prompts, params, Timer())
    return {f"eval/{k.removeprefix('reward/')}": v for k, v in rollout.scores.metrics(prefix="reward/").items()
            if k.endswith("/mean")}


def total_steps(config: OnlineConfig, num_prompts: int) -> int:
    """max_steps, or `epochs` passes over the prompts at batch_size prompts per step."""
    return config.max_steps if config.max_steps > 0 else max(1, int(config.epochs * num_prompts) // config.batch_size)


def build_sampler(config: OnlineConfig, model, tokenizer):
    """The rollout engine, sampling from the (unwrapped) policy's current weights."""
    options = {"batch_size": config.generation_batch_size} if config.generation_batch_size else {}
    return get_sampler(config.rollout_engine, unwrap(model), tokenizer, **options)


def final_evaluation(run, sampler, reward_set, prompts: list[Prompt], config: OnlineConfig,
                     generate: Callable[..., Rollout] = generate_and_score) -> None:
    """Held-out rewards after training, logged and written to eval.json."""
    if not prompts:
        return
    result = evaluate_rewards(sampler, reward_set, prompts, config, generate)
    log.info("held-out: %s", ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    if run.main:
        (run.dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")


def sampling_params(config: OnlineConfig, group_size: int, temperature: float) -> SamplingParams:
    return params_from_keys(config, n=group_size, max_new_tokens=config.max_completion_length,
                            min_new_tokens=config.min_completion_length, temperature=temperature)

