"""`tether eval pm`: pairwise accuracy and calibration of a preference model, beside a reward model.

    tether eval pm --model runs/pm/final --data pairs_eval.jsonl [--train-data pairs.jsonl] \
                   [--reward-model runs/rm/final] --output pm_eval.json

The preference model's P(chosen ≻ rejected) = σ(d(x, chosen, rejected)) is judged exactly as `tether eval rm`
judges σ(r_w − r_l): accuracy (d > 0), calibration (every pair in both orders, binned) and ECE. With
`--reward-model`, the reward model is scored on the same pairs, and with `--train-data` both are scored on
the training pairs too: the comparison of Munos et al. 2024 (train vs held-out accuracy of each).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tether.eval.reward_model import evaluate_margins


def pairwise_results(pairs, *, preference_model=None, reward_model=None, bins: int = 10) -> dict:
    """{"pm": ..., "rm": ...} results of `evaluate_margins` on `pairs` (PreferenceRow-like: prompt, chosen,
    rejected) for the scorers given: a `PreferenceScorer` (margins = logits d) and/or a `RewardScorer`."""
    prompts, chosen, rejected = [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs]
    results = {}
    if preference_model is not None:
        results["pm"] = evaluate_margins(preference_model.logits(prompts, chosen, rejected), bins)
    if reward_model is not None:
        c, r = reward_model.score(prompts, chosen), reward_model.score(prompts, rejected)
        results["rm"] = evaluate_margins([a - b for a, b in zip(c, r)], bins)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether eval pm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="preference model folder (the `final/` of `tether pm`)")
    parser.add_argument("--data", required=True, help="held-out preference file: {prompt, chosen, rejected} rows")
    parser.add_argument("--train-data", default=None, help="the training pairs, to set train beside held-out")
    parser.add_argument("--reward-model", default=None, help="a `tether rm` folder to score on the same pairs")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per forward (default 16)")
    parser.add_argument("--bins", type=int, default=10, help="calibration bins over [0, 1] (default 10)")
    parser.add_argument("--output", default="eval_pm.json", help="JSON file for the results (default eval_pm.json)")
    parser.add_argument("--chat-template", default="auto", choices=["auto", "always", "never"],
                        help="how prompts are rendered; use the value the models were trained with")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    args = parser.parse_args(argv)
    if args.bins < 1 or args.batch_size < 1:
        parser.error("--bins and --batch-size must be >= 1")

    from tether.data.loading import load_rows
    from tether.data.preference import read_preference_rows
    from tether.models.preference import PreferenceScorer
    from tether.models.value import RewardScorer

    pm = PreferenceScorer(args.model, device=args.device, batch_size=args.batch_size,
                          chat_template=args.chat_template)
    rm = None if args.reward_model is None else RewardScorer(args.reward_model, device=args.device,
                                                             batch_size=args.batch_size,
                                                             chat_template=args.chat_template)
    result = {"model": str(args.model), "reward_model": args.reward_model}
    splits = {"held_out": args.data} | ({"train": args.train_data} if args.train_data else {})
    for split, source in splits.items():
        pairs, _ = read_preference_rows(load_rows(source, "train"), source=source, margin_column="")
        result[split] = pairwise_results(pairs, preference_model=pm, reward_model=rm, bins=args.bins)
    print(f"{'model':<18}" + "".join(f"{s + ' accuracy':>20}{s + ' ECE':>16}" for s in splits))
    for kind, label in (("pm", "preference model"), ("rm", "reward model")):
        if kind in result["held_out"]:
            print(f"{label:<18}" + "".join(f"{result[s][kind]['accuracy']:>20.4f}{result[s][kind]['ece']:>16.4f}"
                                           for s in splits))
    output = Path(args.output)
    if output.parent != Path(""):
        output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")
    return 0
