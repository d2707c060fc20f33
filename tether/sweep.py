"""`tether sweep`: one recipe over a list of values of one config key, each run in its own process and folder,
then a summary and a plot (seed 003, exercises 17, 20 and 22).

    tether sweep grpo --config x.yaml --key kl_coef --values 0 0.02 0.1 0.5 [key=value ...]

writes `output_dir/<key>=<value>/` (an ordinary run folder each, with `run.log`), `sweep.json` and
`sweep.png`: the final KL from the reference and the final reward against the value, and, when a gold
metric is logged (a reward function of weight 0 whose name contains "gold", e.g. the RLHF demo's
`tether.demo.tasks:gold_rewards`), gold and proxy reward against the value. "Final" is the mean over the
last `tail` fraction of the logged steps (default 0.2), since one step's sample means are noisy. Each run is a
fresh `python -m tether` process, so its peak memory (`peak_memory_mb`) is its own.

From Python: `tether.sweep.sweep("grpo", "kl_coef", [0, 0.1], config="x.yaml", overrides=["max_steps=20"])`
returns the summary.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

from tether.config import ConfigError, load_config
from tether.demo.report import plot_series, print_table, read_jsonl

# Metrics summarised for every run (when logged); the gold metric is found by name (see gold_metric).
KL_METRIC = "kl_ref_seq"  # KL of a completion from π_ref, k1 summed over its tokens (nats)
SUMMARY_METRICS = ("reward_mean", "kl_ref_seq", "kl_ref", "entropy", "grad_var", "peak_memory_mb", "step_time")


def run_dir_name(key: str, value: str) -> str:
    """`<key>=<value>` with anything but letters, digits and `._=-` made `_` (a safe folder name)."""
    return re.sub(r"[^A-Za-z0-9._=-]", "_", f"{key}={value}")


def check_sweep(recipe: str, key: str, values: list[str], config: str | None, overrides: list[str]):
    """Build every run's config before any runs (a bad key or value stops the sweep now, naming it)."""
    from tether.cli import RECIPES, load_recipe

    if recipe not in RECIPES:
        raise ConfigError(f"tether sweep: unknown recipe {recipe!r}; one of {', '.join(RECIPES)}")
    if not values:
        raise ConfigError("tether sweep: --values needs at least one value")
    if len(set(values)) < len(values):
        raise ConfigError(f"tether sweep: --values repeats a value: {values}")
    if key == "output_dir":
        raise ConfigError("tether sweep: --key output_dir is set by the sweep (one folder per value)")
    config_cls, _ = load_recipe(recipe)
    for value in values:
        load_config(config_cls, config, [*overrides, f"{key}={value}"])


def sweep(recipe: str, key: str, values: list, *, config: str | None = None, overrides: list[str] = (),
          output_dir: str | None = None, tail: float = 0.2, gold: str | None = None) -> dict:
    """Run `recipe` once per value of `key` (each `python -m tether <recipe>` in `output_dir/<key>=<value>`),
    then write and return the summary (`summarise`). A failed run is recorded and the sweep goes on."""
    values = [str(v) for v in values]
    overrides = list(overrides)
    check_sweep(recipe, key, values, config, overrides)
    out = Path(output_dir or f"runs/sweep-{recipe}-{key}")
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for i, value in enumerate(values):
        folder = out / run_dir_name(key, value)
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "tether", recipe, *(["--config", config] if config else []), *overrides,
                   f"{key}={value}", f"output_dir={folder}", "progress=false"]
        print(f"[{i + 1}/{len(values)}] {key}={value} → {folder}", flush=True)
        start = time.perf_counter()
        with open(folder / "run.log", "w") as log_file:
            code = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - start
        if code:
            tail_lines = (folder / "run.log").read_text().splitlines()[-5:]
            print(f"    failed (exit {code}); the end of {folder / 'run.log'}:\n      " + "\n      ".join(tail_lines),
                  file=sys.stderr)
        runs.append({"value": value, "output_dir": str(folder), "returncode": code, "wall_time_s": round(wall, 2)})
    return summarise(out, recipe, key, runs, tail=tail, gold=gold)


def gold_metric(rows: list[dict]) -> str | None:
    """The logged mean of a reward function named like "gold" (logged with weight 0 beside the proxy)."""
    names = sorted({k for row in rows for k in row if k.startswith("reward/") and k.endswith("/mean")
                    and "gold" in k.split("/")[1]})
    return names[0] if names else None


def tail_means(rows: list[dict], tail: float) -> dict[str, float]:
    """Mean of every numeric metric over the last ⌈tail × steps⌉ logged steps (at least one)."""
    if not rows:
        return {}
    last = rows[-max(1, math.ceil(tail * len(rows))):]
    keys = {k for row in last for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {k: sum(r[k] for r in last if k in r) / sum(k in r for r in last) for k in sorted(keys) if k != "step"}


def summarise(out: Path, recipe: str, key: str, runs: list[dict], *, tail: float = 0.2,
              gold: str | None = None) -> dict:
    """Read each run's metrics.jsonl (and eval.json), write `sweep.json` and `sweep.png`, print a table."""
    for run in runs:
        rows = read_jsonl(Path(run["output_dir"]) / "metrics.jsonl")
        final = tail_means(rows, tail)
        run["steps"] = len(rows)
        run["final"] = {k: final[k] for k in SUMMARY_METRICS if k in final}
        run["peak_memory_mb"] = max((r["peak_memory_mb"] for r in rows if "peak_memory_mb" in r), default=None)
        metric = gold or gold_metric(rows)
        if metric and metric in final:
            run["final"]["gold"] = final[metric]
            run["gold_metric"] = metric
        eval_file = Path(run["output_dir"]) / "eval.json"
        if eval_file.exists():
            run["eval"] = json.loads(eval_file.read_text())
    summary = {"recipe": recipe, "key": key, "tail": tail, "runs": runs,
               "plot": str(plot_sweep(out, key, [r for r in runs if r.get("steps")]))}
    (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    header = [key, "final reward", "final KL (nats)", "gold", "peak memory (MB)", "wall (s)"]
    print(print_table(header, [[r["value"], r["final"].get("reward_mean", "-"), r["final"].get(KL_METRIC, "-"),
                                r["final"].get("gold", "-"), r.get("peak_memory_mb") or "-", r["wall_time_s"]]
                               for r in runs]))
    print(f"summary: {out / 'sweep.json'}   plot: {summary['plot']}")
    return summary


def plot_sweep(out: Path, key: str, runs: list[dict]) -> Path:
    """KL and reward (and gold, when logged) against the swept value; categorical values are spaced evenly."""
    try:
        xs = [float(r["value"]) for r in runs]
        xlabel = key
    except ValueError:
        xs, xlabel = list(range(len(runs))), f"{key}: " + ", ".join(r["value"] for r in runs)
    series = {}
    for label, metric in (("final KL from π_ref (nats)", KL_METRIC), ("final reward (proxy)", "reward_mean"),
                          ("final gold reward", "gold")):
        points = [(x, r["final"][metric]) for x, r in zip(xs, runs) if metric in r["final"]]
        if points:
            series[label] = ([p[0] for p in points], [p[1] for p in points])
    return plot_series(out / "sweep.png", f"sweep over {key}", series, xlabel=xlabel, ylabel="final value")


def sweep_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tether sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="tether sweep RECIPE [--config FILE] --key KEY --values V [V ...] [--output-dir DIR] [key=value ...]")
    parser.add_argument("recipe", help="the recipe to run (grpo, ppo, dpo, sft, rm, ...)")
    parser.add_argument("--config", "-c", default=None, help="the recipe's YAML config")
    parser.add_argument("--key", required=True, help="the config key to sweep, e.g. kl_coef (dotted for sections)")
    parser.add_argument("--values", nargs="+", required=True, help="its values, one run each")
    parser.add_argument("--output-dir", default=None, help="sweep folder (default runs/sweep-<recipe>-<key>)")
    parser.add_argument("--tail", type=float, default=0.2,
                        help="final = mean over this fraction of the last logged steps (default 0.2)")
    parser.add_argument("--gold", default=None,
                        help="metric plotted as gold (default: a logged reward/<name>/mean whose name has 'gold')")
    # key=value words are the runs' overrides wherever they stand (--values would otherwise swallow them)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args, unknown = parser.parse_known_args([a for a in argv if a not in overrides])
    if unknown:
        raise ConfigError(f"unexpected argument {unknown[0]!r}: options for the runs are given as key=value")
    if not 0 < args.tail <= 1:
        raise ConfigError(f"--tail must be in (0, 1], got {args.tail}")
    summary = sweep(args.recipe, args.key, args.values, config=args.config,
                    overrides=overrides, output_dir=args.output_dir, tail=args.tail,
                    gold=args.gold)
    return 1 if any(r["returncode"] for r in summary["runs"]) else 0
