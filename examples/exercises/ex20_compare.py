"""Exercises 20 and 22 (4): PPO against GRPO on the same task, over several seeds: peak memory, wall time,
the stability of the reward and KL curves (their spread across seeds) and the final reward.

Each run is its own process (`tether.sweep.sweep` over `seed`), so each peak memory (`peak_memory_mb`: RSS
on CPU, max_memory_allocated on CUDA) is that run's own. PPO holds the policy, a critic (a separate value
model, with its own optimizer) and the reference; GRPO the policy and the reference.

    python examples/exercises/ex20_compare.py [--out runs/exercises/ex20_compare] [--seeds 0 1 2] [key=value ...]
"""

import argparse
import json
import statistics
from pathlib import Path

from tether.demo.report import metric_series, plot_series, read_jsonl
from tether.sweep import sweep

HERE = Path(__file__).parent
CONFIGS = {"ppo": HERE / "ex18_ppo_polite.yaml", "grpo": HERE / "ex20_grpo_polite.yaml"}


def curve_spread(runs: list[list[dict]], key: str) -> float:
    """Mean over steps of the standard deviation across seeds of `key` (0 = every seed follows one curve)."""
    steps = min(len(rows) for rows in runs)
    return statistics.mean(statistics.pstdev(rows[s][key] for rows in runs) for s in range(steps))


def compare(out: Path, seeds=(0, 1, 2), overrides=()) -> dict:
    result, curves = {}, {}
    for algorithm, config in CONFIGS.items():
        summary = sweep(algorithm, "seed", list(seeds), config=str(config), output_dir=str(out / algorithm),
                        overrides=[f"rewards=[{{name: '{HERE / 'rewards.py'}:polite'}}]", *overrides])
        runs = [read_jsonl(Path(r["output_dir"]) / "metrics.jsonl") for r in summary["runs"]]
        curves[algorithm] = runs
        result[algorithm] = {
            "peak_memory_mb": statistics.mean(r["peak_memory_mb"] for r in summary["runs"]),
            "train_time_s": statistics.mean(sum(row["step_time"] for row in rows) for rows in runs),
            "final_reward": [r["final"]["reward_mean"] for r in summary["runs"]],
            "final_kl": [r["final"]["kl_ref_seq"] for r in summary["runs"]],
            "reward_spread_across_seeds": curve_spread(runs, "reward_mean"),
            "kl_spread_across_seeds": curve_spread(runs, "kl_ref_seq")}
    result["plots"] = [str(plot_series(out / f"{key}.png", f"{key} per step, each seed",
                                       {f"{a} seed {s}": metric_series(rows, key) for a, runs in curves.items()
                                        for s, rows in zip(seeds, runs)}, ylabel=key))
                       for key in ("reward_mean", "kl_ref_seq")]
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/exercises/ex20_compare")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args, overrides = parser.parse_known_args()
    print(json.dumps(compare(Path(args.out), args.seeds, overrides), indent=2))
