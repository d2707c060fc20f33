"""Exercise 15: REINFORCE with and without its running-mean baseline; the gradient variance of both.

Runs exercise 14's config twice with `log_grad_variance: true` (per-completion policy gradients at the start of
each step, tether.runtime.grad_stats), once with `reinforce_baseline: false` (advantage = reward), and plots
grad_var (tr Cov of one completion's gradient) per step for both.

    python examples/exercises/ex15_baseline_variance.py [--out runs/exercises/ex15] [--steps 30]
"""

import argparse
import json
import statistics
from pathlib import Path

from tether.config import load_config
from tether.demo.report import metric_series, plot_series, read_jsonl
from tether.recipes import grpo

CONFIG = Path(__file__).with_name("ex14_reinforce.yaml")
REWARD = Path(__file__).with_name("rewards.py")


def run(out: Path, steps: int = 30, seed: int = 0) -> dict:
    curves = {}
    for baseline in (True, False):
        name = "with_baseline" if baseline else "no_baseline"
        grpo.train(load_config(grpo.GRPOConfig, str(CONFIG), [
            f"output_dir={out / name}", f"max_steps={steps}", f"seed={seed}", "progress=false",
            f"rewards=[{{name: '{REWARD}:digit_share'}}]", "log_grad_variance=true",
            f"reinforce_baseline={str(baseline).lower()}"]))
        curves[name] = read_jsonl(out / name / "metrics.jsonl")
    mean_var = {name: statistics.mean(r["grad_var"] for r in rows) for name, rows in curves.items()}
    summary = {"mean_grad_var": mean_var, "ratio": mean_var["no_baseline"] / mean_var["with_baseline"],
               "final_reward": {name: rows[-1]["reward_mean"] for name, rows in curves.items()},
               "plot": str(plot_series(out / "grad_variance.png", "REINFORCE: variance of one completion's gradient",
                                       {name: metric_series(rows, "grad_var") for name, rows in curves.items()},
                                       ylabel="tr Cov(g_i)")),
               "reward_plot": str(plot_series(out / "reward.png", "REINFORCE: mean reward",
                                              {name: metric_series(rows, "reward_mean")
                                               for name, rows in curves.items()}, ylabel="reward"))}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/exercises/ex15")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(run(Path(args.out), args.steps, args.seed), indent=2))
