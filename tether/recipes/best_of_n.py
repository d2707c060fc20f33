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

from tether import models
from tether.config import save_config
from tether.config.best_of_n import BestOfNConfig
from tether.data.loading import load_rows
from tether.eval.generation import sample_share, write_jsonl
from tether.eval.score import score_samples
from tether.rewards import RewardSet
from tether.rollout.params import SamplingConfig
from tether.runtime import distributed
from tether.runtime.device import choose_device, choose_dtype

log = logging.getLogger("tether")


def reward_specs(rewards: list, reward_model: str) -> list:
    """The RewardSet specs of a recipe: its `rewards` plus its `reward_model` folder, if any."""
    return list(rewards) + ([{"name": "reward_model", "path": reward_model}] if reward_model else [])


# ----------------------------------------------------------------------------- choosing samples (pure)

def select(rewards: list[float | None], *, threshold: float | None = None, top_k: int = 0) -> list[int]:
    """Indices of the samples to keep, in sample order: reward not None, >= threshold (if given), and among
    the top_k highest (if top_k > 0; on equal rewards the earlier sample ranks higher).

    Best-of-N is `select(rewards, top_k=1)`.
    """
    candidates = [i for i, r in enumerate(rewards) if r is not None and (threshold is None or r >= threshold)]
    if top_k > 0:
        candidates = sorted(sorted(candidates, key=lambda i: (-rewards[i], i))[:top_k])
    return candidates


def candidate_rewards(samples: list[dict]) -> list[float | None]:
    """Each sample's reward, None for an empty completion (never chosen: it makes no training example)."""
    return [s["reward"] if s["completion"].strip() else None for s in samples]


# ----------------------------------------------------------------------------- sample and score

def sample_and_score(model, tokenizer, rows: list[dict], *, sampling: SamplingConfig, rewards: RewardSet,
                     seed: int, chat_template: str = "auto", source: str = "data") -> list[list[dict]]:
    """N samples per row, scored. Returns, per row, its samples as dicts:
    {prompt, completion, reward (weighted total), rewards: {function: value}, sample_index, finish_reason,
    completion_tokens, ...the row's other columns}.

    Under torchrun each rank samples and scores its share of the rows (whole chunks of sampling.batch_size,
    seeded as one process seeds them: `sample_share`) and every rank returns every row's samples, in row
    order: the same result as one process."""
    share, batch = sample_share(model, tokenizer, rows, sampling.params(seed), batch_size=sampling.batch_size,
                                chat_template=chat_template, engine=sampling.engine, source=source)
    mine = rows[share.start:share.stop]
    per_row: list[list[dict]] = [[] for _ in mine]
    if mine:
        lengths = [len(ids) for ids in batch.completion_ids]
        scored = score_samples(rewards, mine, batch.completions, batch.prompt_index, completion_lengths=lengths)
        for i, (p, j) in enumerate(zip(batch.prompt_index, batch.sample_index)):
            per_row[p].append({
                **mine[p], "completion": batch.completions[i], "reward": scored.total[i],
                "rewards": {name: values[i] for name, values in scored.per_function.items()},
                "sample_index": j, "finish_reason": batch.finish_reasons[i], "completion_tokens": lengths[i],
            })
    return distributed.gather_lists(per_row)


def number(value: float | None) -> str:
    """A mean for the log: 4 decimals, or n/a when there was nothing to average."""
    return "n/a" if value is None else f"{value:.4f}"


def load_sampling_model(name: str, device: str, dtype: str, seed: int):
    device = choose_device(device)
    return models.load(name, dtype=choose_dtype(dtype, device), device=device, seed=seed)


def run(config: BestOfNConfig) -> Path:
    """Run best-of-N as configured; returns the path of best.jsonl. Under torchrun each rank samples a share
    of the prompts and rank 0 writes the files, the same as one process writes."""
    distributed.init(config.distributed.timeout_s)
    out = Path(config.output_dir)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    rows = load_rows(config.data, config.data_split)
    reward_set = RewardSet(reward_specs(config.rewards, config.reward_model))
    reward_set.check_rows(config.data, list(enumerate(rows)))
    model, tokenizer = load_sampling_model(config.model, config.device, config.dtype, config.seed)
    log.info("best-of-%d: %d prompts, model %s, rewards %s", config.sampling.n, len(rows), config.model, reward_set)

    samples = sample_and_score(model, tokenizer, rows, sampling=config.sampling, rewards=reward_set,
                               seed=config.seed, chat_template=config.chat_template, source=config.data)
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
