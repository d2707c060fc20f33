"""`tether eval rm`: pairwise accuracy, mean margin and calibration of a reward model on a preference file.

    tether eval rm --model runs/rm/final --data examples/data/pref_eval.jsonl --bins 10   # → runs/rm/final/eval_rm.json

Accuracy is the fraction of pairs with r_w > r_l; the margin is the mean of r_w − r_l. Calibration asks
whether the Bradley-Terry probability P(chosen ≻ rejected) = σ(r_w − r_l) means what it says: every pair
is counted in both orders, (σ(d), preferred) and (σ(−d), not preferred), predictions are binned, and each
bin's mean prediction is set against the observed fraction preferred. ECE is the count-weighted mean gap.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tether.runtime.options import parse_args


def calibration_table(margins, bins: int = 10) -> tuple[list[dict], float]:
    """(rows, ECE) of the reliability table of σ(margin), each pair counted in both orders.

    margins (N,) are r_w − r_l. Row: {lower, upper, count, predicted (mean), observed (fraction preferred)};
    empty bins have count 0 and None for predicted/observed.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    margins = torch.as_tensor(margins, dtype=torch.float64)
    p = torch.sigmoid(margins)  # (N,) P(chosen ≻ rejected)
    predicted = torch.cat([p, 1 - p])  # (2N,): the pair as given, then swapped
    outcome = torch.cat([torch.ones_like(p), torch.zeros_like(p)])  # (2N,) 1 = the first one was preferred
    index = (predicted * bins).floor().clamp(max=bins - 1).long()  # (2N,) bin of each prediction
    rows, ece = [], 0.0
    for b in range(bins):
        in_bin = index == b
        count = int(in_bin.sum())
        row = {"lower": b / bins, "upper": (b + 1) / bins, "count": count, "predicted": None, "observed": None}
        if count:
            row["predicted"] = float(predicted[in_bin].mean())
            row["observed"] = float(outcome[in_bin].mean())
            ece += count / len(predicted) * abs(row["predicted"] - row["observed"])
        rows.append(row)
    return rows, ece


def evaluate_margins(margins, bins: int = 10) -> dict:
    """Accuracy, mean margin, ties and the calibration table of margins r_w − r_l (N,)."""
    margins = torch.as_tensor(margins, dtype=torch.float64)
    table, ece = calibration_table(margins, bins)
    return {"num_pairs": len(margins), "accuracy": float((margins > 0).double().mean()),
            "mean_margin": float(margins.mean()), "ties": int((margins == 0).sum()), "ece": ece,
            "calibration": table}


def format_report(result: dict) -> str:
    lines = [f"pairs {result['num_pairs']}   accuracy {result['accuracy']:.4f}   mean margin "
             f"{result['mean_margin']:.4f}   ties {result['ties']}   ECE {result['ece']:.4f}",
             f"calibration: each pair in both orders ({2 * result['num_pairs']} orderings of {result['num_pairs']} "
             f"pairs)",
             "", f"{'P(first ≻ second)':>22}  {'orderings':>9}  {'predicted':>9}  {'observed':>8}"]
    for row in result["calibration"]:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"{row['lower']:>13.2f} – {row['upper']:.2f}  {row['count']:>9}  {fmt(row['predicted']):>9}  "
                     f"{fmt(row['observed']):>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether eval rm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="reward model folder (the `final/` of `tether rm`)")
    parser.add_argument("--data", required=True, help="preference file: {prompt, chosen, rejected} or HH-style rows")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default 16)")
    parser.add_argument("--bins", type=int, default=10, help="calibration bins over [0, 1] (default 10)")
    parser.add_argument("--output", default=None,
                        help="JSON file for the results (default: eval_rm.json in the model folder)")
    parser.add_argument("--split", default="train", help="split of a `datasets` source (default train)")
    parser.add_argument("--chat-template", default="auto", choices=["auto", "always", "never"],
                        help="how prompts are rendered; use the value the reward model was trained with")
    parser.add_argument("--max-length", type=int, default=None, help="keep the last N tokens of longer sequences")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) invalid rows")
    args = parse_args(parser, argv)
    if args.bins < 1 or args.batch_size < 1:
        parser.error("--bins and --batch-size must be >= 1")

    from tether.data.loading import load_rows
    from tether.data.preference import read_preference_rows
    from tether.models.value import RewardScorer

    pairs, stats = read_preference_rows(load_rows(args.data, args.split), source=args.data,
                                        skip_bad_rows=args.skip_bad_rows, margin_column="")
    if stats.skipped:
        print(stats.summary(args.data))
    scorer = RewardScorer(args.model, device=args.device, batch_size=args.batch_size,
                          chat_template=args.chat_template, max_length=args.max_length)
    prompts = [p.prompt for p in pairs]
    chosen = scorer.score(prompts, [p.chosen for p in pairs])
    rejected = scorer.score(prompts, [p.rejected for p in pairs])
    result = evaluate_margins([c - r for c, r in zip(chosen, rejected)], args.bins)
    result.update({"model": str(args.model), "data": str(args.data), "skipped_rows": stats.skipped,
                   "rewards_chosen": sum(chosen) / len(chosen), "rewards_rejected": sum(rejected) / len(rejected)})
    print(format_report(result))
    output = Path(args.output) if args.output else Path(args.model) / "eval_rm.json"
    if output.parent != Path(""):
        output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")
    return 0
