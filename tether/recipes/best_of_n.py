"""Best-of-N sampling: sample N completions per prompt, score them, keep the best one.

    y* = argmax_{y_1..y_N ~ π(·|x)} r(x, y_i)

Read top to bottom: load the model and the prompts → sample N per prompt → score every sample with the
reward functions (and/or a reward model) → pick each prompt's best → write `best.jsonl` (and `all.jsonl`).

Choice rules (also used by rejection sampling, `select`): a None reward ("cannot judge") is never chosen,
nor is an empty completion (it would make no training example); on equal rewards the earlier sample wins.
A prompt with no judged, non-empty sample (e.g. every reward None) gets no best row: it is skipped and
counted in the log and in `summary.json`, never silently.

`best.jsonl` rows are `{prompt, completion, reward, rewards: {function: value}, ...input columns}`, ready
as SFT data (`tether sft data=runs/bon/best.jsonl`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tether.config.best_of_n import BestOfNConfig
from tether.data.loading import load_rows
from tether.eval.generation import write_jsonl
from tether.eval.sampling import (candidate_rewards, load_sampling_model, number, reward_specs,  # noqa: F401
                                  sample_and_score, select)
from tether.rewards import RewardSet
from tether.runtime import distributed
from tether.runtime.run import open_run_dir

log = logging.getLogger("tether")


def run(config: BestOfNConfig) -> Path:
    """Run best-of-N as configured; returns the path of best.jsonl. Under torchrun each rank samples a share
    of the prompts and rank 0 writes the files, the same as one process writes."""
    out = open_run_dir(config)
    rows = load_rows(config.data, config.data_split)
    reward_set = RewardSet(reward_specs(config.rewards, config.reward_model))
    reward_set.check_rows(config.data, list(enumerate(rows)))
    model, tokenizer = load_sampling_model(config.model, config.device, config.dtype, config.seed)
    log.info("best-of-%d: %d prompts, model %s, rewards %s", config.sampling.n, len(rows), config.model, reward_set)

    samples = sample_and_score(model, tokenizer, rows, sampling=config.sampling, rewards=reward_set,
                               seed=config.seed, chat_template=config.chat_template,
                               engine=config.rollout_engine, source=config.data)
    if distributed.is_main():
        write_best(config, out, samples)
    distributed.barrier()
    return out / "best.jsonl"


def write_best(config: BestOfNConfig, out: Path, samples: list[list[dict]]) -> None:
    """Choose each prompt's best sample; write best.jsonl, all.jsonl (write_all) and summary.json."""
    best_rows, all_rows, skipped = [], [], []
    for p, prompt_samples in enumerate(samples):
        chosen = select(candidate_rewards(prompt_samples), top_k=1)  # argmax; the first sample wins ties
        if not chosen:
            skipped.append(p)
        else:
            best_rows.append(prompt_samples[chosen[0]])
        all_rows += [{**s, "prompt_index": p, "chosen": s["sample_index"] in chosen} for s in prompt_samples]
    if skipped:
        log.warning("best-of-n: %d of %d prompts skipped: no sample with a reward and a non-empty completion "
                    "(rows %s%s)", len(skipped), len(samples), skipped[:10], "..." if len(skipped) > 10 else "")

    all_rewards = [s["reward"] for s in all_rows if s["reward"] is not None]
    summary = {
        "prompts": len(samples), "samples": len(all_rows), "written": len(best_rows),
        "skipped_prompts": len(skipped), "skipped_rows": skipped,
        "none_rewards": sum(s["reward"] is None for s in all_rows),
        "empty_completions": sum(not s["completion"].strip() for s in all_rows),
        "mean_reward": sum(all_rewards) / len(all_rewards) if all_rewards else None,
        "mean_best_reward": sum(r["reward"] for r in best_rows) / len(best_rows) if best_rows else None,
    }
    log.info("best-of-n: mean reward %s over all samples, %s over the best; wrote %d rows",
             number(summary["mean_reward"]), number(summary["mean_best_reward"]), len(best_rows))
    write_jsonl(out / "best.jsonl", best_rows)
    if config.write_all:
        write_jsonl(out / "all.jsonl", all_rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
