"""Sample N completions per prompt and score them, and choose among them: best-of-N, rejection sampling
(rft) and distillation's traces share these steps."""

from __future__ import annotations

from tether import models
from tether.eval.generation import sample_share
from tether.eval.score import score_samples
from tether.models.device import choose_device, choose_dtype
from tether.rewards import RewardSet
from tether.rollout.params import SamplingConfig
from tether.runtime import distributed


def reward_specs(rewards: list, reward_model: str) -> list:
    """The RewardSet specs of a recipe: its `rewards` plus its `reward_model` folder, if any."""
    return list(rewards) + ([{"name": "reward_model", "path": reward_model}] if reward_model else [])


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


def sample_and_score(model, tokenizer, rows: list[dict], *, sampling: SamplingConfig, rewards: RewardSet,
                     seed: int, chat_template: str = "auto", engine: str = "builtin",
                     source: str = "data") -> list[list[dict]]:
    """N samples per row, scored. Returns, per row, its samples as dicts:
    {prompt, completion, reward (weighted total), rewards: {function: value}, sample_index, finish_reason,
    completion_tokens, ...the row's other columns}.

    Under torchrun each rank samples and scores its share of the rows (whole chunks of sampling.batch_size,
    seeded as one process seeds them: `sample_share`) and every rank returns every row's samples, in row
    order: the same result as one process."""
    share, batch = sample_share(model, tokenizer, rows, sampling.params(seed), batch_size=sampling.batch_size,
                                chat_template=chat_template, engine=engine, source=source)
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
    """(model, tokenizer) of `name` on `device` in `dtype` (config values such as auto), for sampling only."""
    device = choose_device(device)
    return models.load(name, dtype=choose_dtype(dtype, device), device=device, seed=seed)
