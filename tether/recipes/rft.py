"""Rejection-sampling fine-tuning (RFT): sample, keep the completions the reward accepts, SFT on them.

    for round k = 1..K:
        samples  = N completions per prompt from the sampler (round 1: `sample_model`, else the policy)
        kept     = the samples with reward >= threshold, and/or each prompt's top_k by reward
        policy   = SFT(start = policy, or the base `model`, data = kept)

One round from a fixed model is offline RFT (Yuan et al. 2023, "Scaling relationship on learning
mathematical reasoning"; the rejection-sampling stage of DeepSeek-R1). Several rounds sampling from the
current policy are expert iteration / STaR (Zelikman et al. 2022) / ReST-EM (Singh et al. 2023); those
papers fine-tune the BASE model on each round's data (`finetune_from: base`).

Run folder: `round-k/samples.jsonl` (every sample with its rewards and `kept`), `round-k/kept.jsonl` (the
SFT data), `round-k/sft/` (the SFT run), `round-k/DONE`; `metrics.jsonl` (one line per round: prompts
with at least one kept sample, kept samples, mean reward, eval reward); `kept.jsonl` (every round's kept
rows, with `round`); `final` → the last round's model. Resuming (`resume=true`) skips finished rounds,
reuses a round's kept.jsonl and resumes its SFT from the latest checkpoint.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

from tether.config.rft import RFTConfig
from tether.config.sft import sft_config
from tether.data.loading import load_rows
from tether.eval.generation import write_jsonl
from tether.recipes import sft
from tether.eval.sampling import (candidate_rewards, load_sampling_model, number, reward_specs, sample_and_score,
                                  select)
from tether.rewards import RewardSet
from tether.runtime import distributed
from tether.runtime.run import open_run_dir
from tether.runtime.checkpoint import link_final

log = logging.getLogger("tether")


def keep_samples(samples: list[dict], *, threshold: float | None, top_k: int, dedupe: bool) -> list[int]:
    """Indices of one prompt's samples that pass the filter (see `best_of_n.select`; empty completions never do)."""
    rewards = candidate_rewards(samples)
    if dedupe:  # a repeated completion competes only through its first copy
        seen: set = set()
        for i, s in enumerate(samples):
            if s["completion"] in seen:
                rewards[i] = None
            seen.add(s["completion"])
    return select(rewards, threshold=threshold, top_k=top_k)


def train(config: RFTConfig) -> Path:
    """Run RFT as configured; returns the final model folder (`output_dir/final` → the last round's model).

    Under torchrun every rank samples and scores a share of the prompts, rank 0 writes the round's files, and
    the round's SFT trains data-parallel (`sft.train`)."""
    out = open_run_dir(config)
    rows = load_rows(config.data, config.data_split)
    eval_rows = load_rows(config.eval_data, config.data_split) if config.eval_data else []
    reward_set = RewardSet(reward_specs(config.rewards, config.reward_model))
    reward_set.check_rows(config.data, list(enumerate(rows)))
    if eval_rows:
        reward_set.check_rows(config.eval_data, list(enumerate(eval_rows)))
    policy = config.model

    for k in range(1, config.rounds + 1):
        round_dir = out / f"round-{k}"
        if config.resume and (round_dir / "DONE").exists():  # finished before an interruption
            policy = json.loads((round_dir / "DONE").read_text())["model"]
            log.info("rft round %d: already done, policy %s", k, policy)
            continue
        sampler_name = (config.sample_model or config.model) if k == 1 else policy
        if not (config.resume and (round_dir / "kept.jsonl").exists()):
            sample_and_filter(config, sampler_name, rows, reward_set, round_dir, seed=config.seed + k - 1)
        stats = {"round": k, "sampled_from": sampler_name,
                 **round_stats(load_rows(str(round_dir / "samples.jsonl")))}
        log.info("rft round %d: %d/%d prompts yielded at least one kept sample; kept %d of %d samples; "
                 "mean reward %s", k, stats["prompts_with_kept"], stats["prompts"], stats["kept"],
                 stats["samples"], number(stats["reward_mean"]))

        if stats["kept"]:
            start = config.model if config.finetune_from == "base" else policy
            policy = str(sft.train(sft_config(config, model=start, data=str(round_dir / "kept.jsonl"),
                                              output_dir=str(round_dir / "sft"), seed=config.seed + k - 1,
                                              eval_data="")))
        else:
            log.warning("rft round %d: no sample passed the filter; the policy is unchanged", k)
        stats["model"] = policy
        if eval_rows:
            stats["eval_reward_mean"] = mean_reward(config, policy, eval_rows, reward_set)
        if distributed.is_main():
            (round_dir / "DONE").write_text(json.dumps(stats) + "\n")
            history = [json.loads((out / f"round-{j}" / "DONE").read_text()) for j in range(1, k + 1)]
            write_jsonl(out / "metrics.jsonl", history)  # one line per round, rewritten so a resume never repeats one
        distributed.barrier()

    if distributed.is_main():
        write_jsonl(out / "kept.jsonl", [{**row, "round": k} for k in range(1, config.rounds + 1)
                                         for row in rows_or_empty(out / f"round-{k}" / "kept.jsonl")])
    return link_final(out, Path(policy))


def sample_and_filter(config: RFTConfig, sampler_name: str, rows, reward_set, round_dir: Path, seed: int) -> None:
    """Sample from `sampler_name`, score and filter; write round_dir/samples.jsonl (every sample, with
    `kept`) and round_dir/kept.jsonl (the SFT data). Every rank samples its share; rank 0 writes."""
    model, tokenizer = load_sampling_model(sampler_name, config.device, config.dtype, config.seed)
    samples = sample_and_score(model, tokenizer, rows, sampling=config.sampling, rewards=reward_set, seed=seed,
                               chat_template=config.chat_template, engine=config.rollout_engine, source=config.data)
    del model
    gc.collect()
    all_rows, kept_rows = [], []
    for p, prompt_samples in enumerate(samples):
        keep = keep_samples(prompt_samples, threshold=config.threshold, top_k=config.top_k, dedupe=config.dedupe)
        kept_rows += [prompt_samples[i] for i in keep]
        all_rows += [{**s, "prompt_index": p, "kept": i in keep} for i, s in enumerate(prompt_samples)]
    if distributed.is_main():
        round_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl(round_dir / "samples.jsonl", all_rows)
        write_jsonl(round_dir / "kept.jsonl", kept_rows)
    distributed.barrier()  # the other ranks read these files next


def round_stats(samples: list[dict]) -> dict:
    """Counts of one round from its samples.jsonl rows: prompts, prompts with at least one kept sample, ..."""
    rewards = [s["reward"] for s in samples if s["reward"] is not None]
    return {"prompts": len({s["prompt_index"] for s in samples}),
            "prompts_with_kept": len({s["prompt_index"] for s in samples if s["kept"]}),
            "samples": len(samples), "kept": sum(s["kept"] for s in samples),
            "none_rewards": len(samples) - len(rewards),
            "reward_mean": sum(rewards) / len(rewards) if rewards else None}


def mean_reward(config: RFTConfig, model_name: str, rows: list[dict], reward_set: RewardSet) -> float | None:
    """Mean reward of the model's samples on held-out prompts (sampling as configured)."""
    model, tokenizer = load_sampling_model(model_name, config.device, config.dtype, config.seed)
    samples = sample_and_score(model, tokenizer, rows, sampling=config.sampling, rewards=reward_set,
                               seed=config.seed, chat_template=config.chat_template,
                               engine=config.rollout_engine, source=config.eval_data)
    rewards = [s["reward"] for prompt_samples in samples for s in prompt_samples if s["reward"] is not None]
    mean = sum(rewards) / len(rewards) if rewards else None
    log.info("eval reward mean of %s: %s", model_name, number(mean))
    return mean


def rows_or_empty(path: Path) -> list[dict]:
    return load_rows(str(path)) if path.exists() and path.stat().st_size else []


