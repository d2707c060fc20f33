"""RL with verifiable rewards on the tiny model: the seeds' pipeline, measured.

1. make an arithmetic task (a + b, operands 0..19) with a held-out test split no training row touches;
2. cold-start SFT on a small slice of worked answers `<think>ones</think><answer>sum</answer>`;
3. evaluate pass@1 (mean over n samples), pass@k and maj@k on the held-out problems;
4. GRPO from the SFT model with the exact-answer (math) and format rewards on other problems;
5. evaluate again; write plots, report.html and summary.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tether import models
from tether.config import load_config
from tether.demo.report import metric_series, plot_series, print_table, read_jsonl, write_html, write_jsonl
from tether.demo.tasks import arithmetic_split
from tether.eval.generation import evaluate
from tether.recipes import grpo, sft

REWARDS = [{"name": "math", "weight": 1.0, "extract": "answer_tag"},
           {"name": "format", "weight": 0.2}]


@dataclass
class Size:
    n_sft: int          # cold-start demonstrations
    n_rl: int           # extra GRPO prompts; GRPO also sees the SFT prompts (never the test split)
    n_test: int         # held-out problems
    sft_steps: int
    sft_batch_size: int
    grpo_steps: int
    prompts_per_step: int
    group_size: int
    grpo_lr: float
    eval_n: int         # samples per test problem for pass@1 / maj@k
    # One token per reasoning tag (as Qwen's tokenizers have): an answer is ~8 tokens instead of ~36 characters.
    model: str = "tiny:reasoning_tags=1"


SIZES = {
    "default": Size(n_sft=250, n_rl=50, n_test=100, sft_steps=150, sft_batch_size=32, grpo_steps=150,
                    prompts_per_step=64, group_size=8, grpo_lr=2e-4, eval_n=8),
    "small": Size(n_sft=250, n_rl=50, n_test=40, sft_steps=150, sft_batch_size=32, grpo_steps=40,
                  prompts_per_step=64, group_size=8, grpo_lr=2e-4, eval_n=4),
}
MAX_OPERAND = 19
MAX_NEW_TOKENS = 40


def held_out_eval(folder: Path, test_rows: list[dict], size: Size, seed: int) -> dict:
    model, tokenizer = models.load(str(folder))
    result = evaluate(model, tokenizer, test_rows, n=size.eval_n, ks=[1, size.eval_n], temperature=1.0, top_p=1.0,
                      max_new_tokens=MAX_NEW_TOKENS, rewards=REWARDS[:1], batch_size=64, seed=seed,
                      keep_samples=True)
    return result


def run(output_dir: str, *, seed: int = 0, size: str = "default", **_) -> dict:
    start = time.time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = SIZES[size]
    train_rows, test_rows = arithmetic_split(s.n_sft + s.n_rl, s.n_test, max_operand=MAX_OPERAND, seed=seed)
    sft_rows, rl_rows = train_rows[: s.n_sft], train_rows
    sft_data = write_jsonl(out / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["completion"]}
                                              for r in sft_rows])
    rl_data = write_jsonl(out / "rl_prompts.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]} for r in rl_rows])
    test_data = write_jsonl(out / "test.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]} for r in test_rows])
    test_eval_rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in test_rows]

    print(f"[1/4] cold-start SFT on {s.n_sft} worked answers ({s.sft_steps} steps)")
    sft_final = sft.train(load_config(sft.SFTConfig, None, {
        "model": s.model, "data": sft_data, "output_dir": str(out / "sft"), "max_steps": s.sft_steps,
        "batch_size": s.sft_batch_size, "learning_rate": 3e-3, "warmup_steps": 10, "max_length": 64, "seed": seed,
        "report_to": [],
    }))
    print("[2/4] held-out evaluation of the SFT model")
    before = held_out_eval(sft_final, test_eval_rows, s, seed)

    print(f"[3/4] GRPO with exact-answer + format rewards ({s.grpo_steps} steps, "
          f"{s.prompts_per_step} prompts x {s.group_size} samples)")
    grpo_final = grpo.train(load_config(grpo.GRPOConfig, None, {
        "model": str(sft_final), "data": rl_data, "eval_data": test_data, "output_dir": str(out / "grpo"),
        "max_steps": s.grpo_steps, "batch_size": s.prompts_per_step, "group_size": s.group_size,
        "learning_rate": s.grpo_lr, "lr_scheduler": "constant", "warmup_steps": 5, "rewards": REWARDS,
        "kl_coef": 1e-3,  # next to nothing as a penalty; it makes the run keep π_ref and log KL(π‖π_sft)
        "max_completion_length": MAX_NEW_TOKENS, "max_prompt_length": 16, "temperature": 1.0, "seed": seed,
        "eval_steps": max(1, s.grpo_steps // 6), "sample_steps": max(1, s.grpo_steps // 6), "report_to": [],
    }))
    print("[4/4] held-out evaluation of the GRPO model")
    after = held_out_eval(grpo_final, test_eval_rows, s, seed)

    summary = summarise(out, before, after, s, seed, time.time() - start)
    write_report(out, summary, before, after, test_eval_rows)
    return summary


def summarise(out: Path, before: dict, after: dict, s: Size, seed: int, wall: float) -> dict:
    keys = [k for k in before["metrics"] if k.startswith(("pass@", "maj@")) or k == "reward/math"]
    summary = {
        "demo": "rlvr", "seed": seed, "wall_time_s": round(wall, 1), "held_out_problems": s.n_test,
        "samples_per_problem": s.eval_n, "sft": {k: before["metrics"][k] for k in keys},
        "grpo": {k: after["metrics"][k] for k in keys},
    }
    summary["pass@1_gain_points"] = round(100 * (after["metrics"]["pass@1_mean"] - before["metrics"]["pass@1_mean"]),
                                          1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [[k, before["metrics"][k], after["metrics"][k]] for k in keys]
    print("\n" + print_table(["held-out metric", "after SFT", "after GRPO"], rows))
    print(f"pass@1 gain: {summary['pass@1_gain_points']:+.1f} points   wall time: {wall:.0f} s")
    return summary


def write_report(out: Path, summary: dict, before: dict, after: dict, test_rows: list[dict]) -> None:
    metrics = read_jsonl(out / "grpo" / "metrics.jsonl")
    images = [
        plot_series(out / "reward.png", "GRPO: mean reward per step",
                    {k: metric_series(metrics, k) for k in ("reward/math/mean", "reward/format/mean")
                     if metric_series(metrics, k)[0]}, ylabel="mean reward"),
        plot_series(out / "heldout_accuracy.png", "held-out accuracy (greedy) during GRPO",
                    {"math": metric_series(metrics, "eval/math/mean")}, ylabel="accuracy (fraction correct)"),
        plot_series(out / "kl.png", "KL to the SFT reference", {"kl": metric_series(metrics, "kl_ref")},
                    ylabel="KL (nats per token)"),
        plot_series(out / "completion_length.png", "completion length (tokens)",
                    {"mean": metric_series(metrics, "completion_length_mean")}, ylabel="tokens"),
    ]
    samples = read_jsonl(out / "grpo" / "samples.jsonl")
    early = [r for r in samples if r.get("step") == min((x.get("step", 0) for x in samples), default=0)][:6]
    late = [r for r in samples if r.get("step") == max((x.get("step", 0) for x in samples), default=0)][:6]
    keys = list(summary["sft"])
    write_html(out / "report.html", title="tether demo: RL with verifiable rewards on the tiny model",
               notes=[f"seed {summary['seed']}, {summary['held_out_problems']} held-out problems, "
                      f"{summary['samples_per_problem']} samples each at temperature 1; "
                      f"wall time {summary['wall_time_s']} s"],
               tables=[("held-out results", ["metric", "after SFT", "after GRPO"],
                        [[k, summary["sft"][k], summary["grpo"][k]] for k in keys])],
               images=images,
               samples=[("GRPO samples, early", early), ("GRPO samples, late", late)])
