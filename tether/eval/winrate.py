"""Win rate of model A against model B: the same prompts, one completion each, compared by a reward model or judge.

    tether eval winrate --data prompts.jsonl --model-a runs/ppo/final --model-b runs/sft/final \
        --reward-model runs/rm/final
    tether eval winrate --completions-a a.jsonl --completions-b b.jsonl --judge Qwen/Qwen2.5-7B-Instruct
    tether eval winrate --completions-a a.jsonl --completions-b b.jsonl --rewards my_rewards.py:helpful

Completions come from sampling both models on `--data` (greedy by default) or from two files of
{prompt, completion} rows in the same prompt order (e.g. written by `tether generate`).

- A reward model (or any reward functions, `--rewards`) scores both completions; A wins a prompt when
  r(A) - r(B) > tie_margin, loses when it is < -tie_margin, ties otherwise.
- A judge is asked pairwise, in both orders to cancel position bias (`tether.rewards.judge`), giving
  p = P(A better); A wins when p - 0.5 > tie_margin, loses when it is < -tie_margin.
A None score ("cannot judge") leaves the prompt out of the rates; it is counted as `unjudged`.
Reports win, tie and loss rates over the judged prompts and win_rate_ties_half = (wins + ties/2) / judged.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

from tether.data.loading import DataError, load_rows
from tether.eval.generation import sample_rows
from tether.eval.score import score_samples
from tether.rewards import RewardSet
from tether.rollout import SamplingParams
from tether.runtime.options import parse_args


def compare(margins: list[float | None], tie_margin: float = 0.0) -> dict:
    """Win/tie/loss counts and rates from A's margin over B per prompt (None = unjudged)."""
    judged = [m for m in margins if m is not None]
    wins = sum(m > tie_margin for m in judged)
    losses = sum(m < -tie_margin for m in judged)
    ties = len(judged) - wins - losses
    total = max(len(judged), 1)
    return {"wins": wins, "ties": ties, "losses": losses, "unjudged": len(margins) - len(judged),
            "judged": len(judged), "win_rate": wins / total, "tie_rate": ties / total, "loss_rate": losses / total,
            "win_rate_ties_half": (wins + ties / 2) / total}


def read_completions(path: str) -> list[dict]:
    rows = load_rows(path)
    for index, row in enumerate(rows):
        for name in ("prompt", "completion"):
            if row.get(name) is None:
                raise DataError(path, f"missing field; a completions file needs '{name}' on every row", index, name)
    return rows


def winrate(rows: list[dict], completions_a: list, completions_b: list, *, reward_specs: list | None = None,
            judge: dict | None = None, tie_margin: float = 0.0) -> dict:
    """Compare completions_a[i] with completions_b[i], completions of rows[i]["prompt"], by reward functions
    (`reward_specs`, e.g. [{name: reward_model, path: ...}]) or a pairwise `judge` ({model, ...options})."""
    index = list(range(len(rows)))
    if judge is not None:
        judge_set = RewardSet([{"name": "judge", "mode": "pairwise", "reference_column": "completion_b", **judge}])
        preference = score_samples(judge_set, rows, completions_a, index, completion_b=list(completions_b)).total
        margins = [None if p is None else p - 0.5 for p in preference]
        result = {"judge": judge, "mean_preference_a": _mean(preference)}
    else:
        reward_set = RewardSet(reward_specs)
        scores_a = score_samples(reward_set, rows, completions_a, index).total
        scores_b = score_samples(reward_set, rows, completions_b, index).total
        margins = [None if a is None or b is None else a - b for a, b in zip(scores_a, scores_b)]
        result = {"rewards": reward_specs, "mean_score_a": _mean(scores_a), "mean_score_b": _mean(scores_b)}
    return {**compare(margins, tie_margin), **result, "margins": margins}


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tether eval winrate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="", help="prompts to sample both models on")
    parser.add_argument("--model-a", default="", help="model A (the candidate)")
    parser.add_argument("--model-b", default="", help="model B (the baseline)")
    parser.add_argument("--completions-a", default="", help="instead of sampling: A's {prompt, completion} rows")
    parser.add_argument("--completions-b", default="", help="instead of sampling: B's rows, same prompt order")
    judges = parser.add_mutually_exclusive_group(required=True)
    judges.add_argument("--reward-model", default="", help="reward model folder (tether rm's final/)")
    judges.add_argument("--judge", default="", help="judge LM (folder, hub name or tiny), asked pairwise")
    judges.add_argument("--rewards", nargs="+", default=None, help="reward names or file.py:function (pointwise)")
    parser.add_argument("--tie-margin", type=float, default=0.0, help="|margin| <= this is a tie")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat-template", choices=["auto", "always", "never"], default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default="", help="write the result (with every prompt's margin) to this JSON")
    args = parse_args(parser, argv)

    if args.completions_a or args.completions_b:
        if not (args.completions_a and args.completions_b):
            parser.error("give both --completions-a and --completions-b")
        rows, rows_b = read_completions(args.completions_a), read_completions(args.completions_b)
        if len(rows) != len(rows_b) or any(a["prompt"] != b["prompt"] for a, b in zip(rows, rows_b)):
            first = next((i for i, (a, b) in enumerate(zip(rows, rows_b)) if a["prompt"] != b["prompt"]),
                         min(len(rows), len(rows_b)))
            raise DataError(args.completions_b, f"prompts differ from {args.completions_a} (first at row {first}); "
                                                "both files need the same prompts in the same order", first, "prompt")
        completions_a, completions_b = [r["completion"] for r in rows], [r["completion"] for r in rows_b]
    else:
        if not (args.data and args.model_a and args.model_b):
            parser.error("give --data, --model-a and --model-b (or --completions-a and --completions-b)")
        rows = load_rows(args.data)
        params = SamplingParams(n=1, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
        completions_a, completions_b = [
            generate_one_each(name, rows, params, args) for name in (args.model_a, args.model_b)]

    result = winrate(rows, completions_a, completions_b, tie_margin=args.tie_margin,
                     reward_specs=([{"name": "reward_model", "path": args.reward_model}] if args.reward_model
                                   else args.rewards),
                     judge={"model": args.judge, "device": args.device} if args.judge else None)
    print(f"A wins {result['wins']}, ties {result['ties']}, loses {result['losses']} of {result['judged']} judged "
          f"prompts ({result['unjudged']} unjudged)\n"
          f"win rate {result['win_rate']:.4f}   tie rate {result['tie_rate']:.4f}   loss rate {result['loss_rate']:.4f}"
          f"   win rate (ties count half) {result['win_rate_ties_half']:.4f}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({**result, "completions_a": completions_a,
                                                 "completions_b": completions_b}, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


def generate_one_each(model_name: str, rows: list[dict], params: SamplingParams, args) -> list[str]:
    """One completion per row from `model_name`, which is loaded here and freed afterwards."""
    from tether import models
    from tether.runtime.device import choose_device, choose_dtype

    device = choose_device(args.device)
    model, tokenizer = models.load(model_name, dtype=choose_dtype("auto", device), device=device, seed=args.seed)
    batch = sample_rows(model, tokenizer, rows, params, batch_size=args.batch_size, chat_template=args.chat_template,
                        source=args.data)
    del model
    gc.collect()
    return batch.completions
