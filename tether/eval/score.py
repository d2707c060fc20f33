"""Score completions with reward functions.

    tether eval score --data completions.jsonl --rewards math format
    tether eval score --data completions.jsonl --reward-config rewards.yaml --output scores.json

Rows hold `prompt`, `completion` and any other columns (e.g. `answer`), which are handed to the reward
functions. Prints mean, std and None count per function (and of the weighted total when there are several);
`--output` writes them with every row's values as JSON.

`score_samples` is the scoring step best-of-n, rejection sampling and `tether eval` share: each sample is
scored with the columns of the dataset row it was generated for.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from tether.data.loading import DataError, load_rows
from tether.rewards import RewardSet
from tether.rewards.base import RewardResult
from tether.runtime.options import parse_args

ROW_TEXT_FIELDS = ("prompt", "completion")


def sample_columns(rows: list[dict], prompt_index: list[int]) -> dict[str, list]:
    """Every column of `rows` except prompt/completion, repeated per sample: {column: [value per sample]}.

    A row without a column gives None for it."""
    names = list(dict.fromkeys(key for row in rows for key in row if key not in ROW_TEXT_FIELDS))
    return {name: [rows[p].get(name) for p in prompt_index] for name in names}


def score_samples(reward_set: RewardSet, rows: list[dict], completions: list, prompt_index: list[int],
                  **extra_columns) -> RewardResult:
    """Score `completions[i]`, a completion of `rows[prompt_index[i]]["prompt"]`, with every reward function.

    The functions get the rows' other columns (aligned per sample) plus `extra_columns` (e.g.
    `completion_lengths`)."""
    prompts = [rows[p]["prompt"] for p in prompt_index]
    return reward_set(prompts, completions, **sample_columns(rows, prompt_index), **extra_columns)


def reward_summary(result: RewardResult) -> dict[str, dict]:
    """{name: {mean, std, none_count, count}} per function, plus `total` when there are several.

    Mean and std are over the values that are not None (NaN when all are None)."""
    flat = result.metrics(prefix="")  # {name}/mean, {name}/std, {name}/none_count, also for total
    names = list(result.per_function) + (["total"] if len(result.per_function) > 1 else [])
    return {name: {"mean": flat[f"{name}/mean"], "std": flat[f"{name}/std"],
                   "none_count": int(flat[f"{name}/none_count"]), "count": len(result.total)} for name in names}


def format_summary(summary: dict[str, dict]) -> str:
    lines = [f"{'reward':<16}{'mean':>10}{'std':>10}{'none':>8}{'rows':>8}"]
    for name, stats in summary.items():
        lines.append(f"{name:<16}{stats['mean']:>10.4f}{stats['std']:>10.4f}{stats['none_count']:>8d}"
                     f"{stats['count']:>8d}")
    return "\n".join(lines)


def read_reward_config(path: str) -> list:
    """Reward specs from a YAML file: a list of {name, weight, ...}, or a mapping with a `rewards:` list."""
    loaded = yaml.safe_load(Path(path).read_text())
    specs = loaded.get("rewards") if isinstance(loaded, dict) else loaded
    if not isinstance(specs, list) or not specs:
        raise ValueError(f"{path}: expected a list of rewards ({{name, weight, ...}}) or a 'rewards:' list")
    return specs


def score_file(data: str, rewards: list) -> tuple[dict, RewardResult]:
    """Score every row of `data` (prompt, completion, columns); returns (summary, RewardResult)."""
    rows = load_rows(data)
    for index, row in enumerate(rows):
        for name in ROW_TEXT_FIELDS:
            if row.get(name) is None:
                raise DataError(data, f"missing field; scoring needs '{name}' on every row", index, name)
    reward_set = RewardSet(rewards)
    reward_set.check_rows(data, list(enumerate(rows)))
    result = score_samples(reward_set, rows, [row["completion"] for row in rows], list(range(len(rows))))
    return reward_summary(result), result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tether eval score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="rows with prompt, completion and other columns")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--rewards", nargs="+", default=None, help="reward names or file.py:function (default math)")
    group.add_argument("--reward-config", default="", help="YAML list of {name, weight, ...options}")
    parser.add_argument("--output", default="", help="write the summary and every row's values to this JSON file")
    args = parse_args(parser, argv)
    rewards = read_reward_config(args.reward_config) if args.reward_config else (args.rewards or ["math"])
    summary, result = score_file(args.data, rewards)
    print(format_summary(summary))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"data": args.data, "rewards": summary,
                                                 "values": {**result.per_function, "total": result.total}},
                                                indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0
