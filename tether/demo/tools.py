"""Tool use learned with RL on the tiny model: multiplication (a 1-digit by a 2-digit number), which it cannot do
reliably in its head.

1. make a multiplication task (a × b, 2 <= a <= 9, 10 <= b <= 99) with a held-out split no training row touches;
2. cold-start SFT on traces of which one in four calls the calculator
   `<calculator>a*b</calculator>` → `<output>p</output>` → `<answer>p</answer>` and the rest answer directly
   `<answer>p</answer>` (a product the model cannot compute); the calculator's output is context only (an SFT
   segment with `train: false`), as the observation tokens are in the RL episodes. The model leaves SFT calling
   the tool about as often as its traces did (~1 in 4) and copying its output well when it does;
3. evaluate held-out accuracy with the calculator (episodes) and without it (one completion), and the
   tool-call rate, sampling 4 episodes per problem at temperature 1 (the policy GRPO trains);
4. GRPO on episodes with the calculator (`env: calculator`; only the model's own tokens carry loss),
   rewarded by the exact answer: episodes that call the tool score, guesses do not, so the policy learns to call it;
5. evaluate again; write summary.json and report.html.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tether import models
from tether.config import load_config
from tether.demo.report import metric_series, plot_series, print_table, read_jsonl, write_html, write_jsonl
from tether.envs import get_env
from tether.recipes import grpo, sft
from tether.rewards import RewardSet
from tether.rollout import SamplingParams, get_sampler
from tether.rollout.episodes import generate_episodes

REWARDS = [{"name": "math", "weight": 1.0, "extract": "answer_tag"}]
MAX_TURNS = 3
MAX_NEW_TOKENS = 80
MAX_TURN_TOKENS = 40
GRPO_TEMPERATURE = 1.0


@dataclass
class Size:
    n_sft: int          # cold-start traces (half with the tool)
    n_rl: int           # GRPO prompts (besides the SFT ones)
    n_test: int         # held-out problems
    sft_steps: int
    grpo_steps: int
    prompts_per_step: int
    group_size: int
    grpo_lr: float
    eval_n: int         # samples per held-out problem (greedy when 1, else temperature 1)
    tool_share: float = 0.25  # share of the SFT traces that call the calculator (the rest answer directly)
    mask_tool_output: bool = True  # cold start: the calculator's output is context only (train: false)
    model: str = "tiny:reasoning_tags=1"


SIZES = {
    # Measured over seeds 0 / 1 / 2 (docs/tools.md): held-out accuracy with the calculator 0.34 / 0.27 / 0.17 after
    # SFT -> 0.77 / 0.85 / 0.35 after GRPO, tool-call rate 0.21 / 0.27 / 0.25 -> 0.90 / 0.97 / 0.71; ~170 s.
    "default": Size(n_sft=500, n_rl=120, n_test=100, sft_steps=1000, grpo_steps=40, prompts_per_step=16,
                    group_size=8, grpo_lr=2e-4, eval_n=4),
    # A smoke run of every stage (seconds): too short to learn to copy the tool's output, no claim.
    "small": Size(n_sft=500, n_rl=120, n_test=50, sft_steps=100, grpo_steps=4, prompts_per_step=8,
                  group_size=4, grpo_lr=2e-4, eval_n=1),
}


def multiplication_split(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train/test problems a*b (a one digit, b two); rows: prompt, answer."""
    rng = random.Random(seed)
    pairs = set()
    while len(pairs) < n_train + n_test:
        pairs.add((rng.randint(2, 9), rng.randint(10, 99)))
    rows = [{"prompt": f"{a}*{b}=", "answer": str(a * b), "a": a, "b": b} for a, b in sorted(pairs)]
    rng.shuffle(rows)
    return rows[:n_train], rows[n_train:]


def trace(row: dict, with_tool: bool, mask_tool_output: bool = False) -> str | list[dict]:
    """A cold-start demonstration: the tool call, its output and the answer; or a direct answer. With
    `mask_tool_output` in segments whose tool output is context only (`train: false`: the model reads it and does
    not learn to write it, as in the RL episodes)."""
    if not with_tool:
        return f"<answer>{row['answer']}</answer>"
    segments = [{"text": f"<calculator>{row['a']}*{row['b']}</calculator>"},
                {"text": f"<output>{row['answer']}</output>", "train": not mask_tool_output},
                {"text": f"<answer>{row['answer']}</answer>"}]
    return segments if mask_tool_output else "".join(segment["text"] for segment in segments)


def calls_tool(i: int, share: float) -> bool:
    """Whether the i-th cold-start trace calls the calculator: spread evenly, `share` of the traces in all."""
    return int((i + 1) * share) > int(i * share)


@torch.no_grad()
def held_out_eval(folder: Path, rows: list[dict], size: Size, seed: int) -> dict:
    """Accuracy (greedy, or the mean over eval_n samples at temperature 1) with the calculator and without it,
    and the share of episodes that called it."""
    model, tokenizer = models.load(str(folder))
    sampler = get_sampler("builtin", model, tokenizer)
    rewards = RewardSet(REWARDS)
    prompt_ids = [tokenizer(r["prompt"])["input_ids"] for r in rows]
    params = SamplingParams(n=size.eval_n, temperature=0.0 if size.eval_n == 1 else 1.0,
                            max_new_tokens=MAX_NEW_TOKENS, seed=seed)
    episodes = generate_episodes(sampler, prompt_ids, rows, get_env("calculator"), params, max_turns=MAX_TURNS,
                                 max_turn_tokens=MAX_TURN_TOKENS)
    plain = sampler.generate(prompt_ids, params)
    answers = [rows[i]["answer"] for i in episodes.prompt_index]
    prompts = [rows[i]["prompt"] for i in episodes.prompt_index]
    with_tool = rewards(prompts, episodes.completions, answer=answers).total
    without = rewards(prompts, plain.completions, answer=answers).total
    called = [c > 0 for c in episodes.tool_calls]
    mean = lambda values: round(sum(values) / max(len(values), 1), 4)  # noqa: E731
    return {"accuracy_with_tool": mean(with_tool), "accuracy_without_tool": mean(without),
            "tool_call_rate": mean(called),
            "accuracy_when_calling": mean([v for v, c in zip(with_tool, called) if c]),
            "accuracy_when_not_calling": mean([v for v, c in zip(with_tool, called) if not c]),
            "examples": [{"prompt": prompts[i], "episode": episodes.turns[i], "reward": with_tool[i]}
                         for i in range(0, min(len(prompts), 6 * size.eval_n), size.eval_n)]}


def run(output_dir: str, *, seed: int = 0, size: str = "default", **_) -> dict:
    start = time.time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = SIZES[size]
    train_rows, test_rows = multiplication_split(s.n_sft + s.n_rl, s.n_test, seed)
    sft_rows = train_rows[:s.n_sft]
    sft_data = write_jsonl(out / "sft.jsonl", [
        {"prompt": r["prompt"], "completion": trace(r, calls_tool(i, s.tool_share), s.mask_tool_output)}
        for i, r in enumerate(sft_rows)])
    rl_data = write_jsonl(out / "rl_prompts.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]}
                                                     for r in train_rows])

    print(f"[1/4] cold-start SFT on {s.n_sft} traces, {s.tool_share:.0%} calling the calculator ({s.sft_steps} steps)")
    sft_final = sft.train(load_config(sft.SFTConfig, None, {
        "model": s.model, "data": sft_data, "output_dir": str(out / "sft"), "max_steps": s.sft_steps,
        "batch_size": 32, "learning_rate": 3e-3, "warmup_steps": 10, "max_length": 96, "seed": seed,
        "report_to": [],
    }))
    print("[2/4] held-out evaluation of the SFT model, with and without the calculator")
    before = held_out_eval(sft_final, test_rows, s, seed)

    print(f"[3/4] GRPO on calculator episodes ({s.grpo_steps} steps, {s.prompts_per_step} prompts x "
          f"{s.group_size} episodes)")
    grpo_final = grpo.train(load_config(grpo.GRPOConfig, None, {
        "model": str(sft_final), "data": rl_data, "output_dir": str(out / "grpo"), "max_steps": s.grpo_steps,
        "batch_size": s.prompts_per_step, "group_size": s.group_size, "learning_rate": s.grpo_lr,
        "lr_scheduler": "constant", "warmup_steps": 5, "rewards": REWARDS, "kl_coef": 1e-3,
        "env": "calculator", "max_turns": MAX_TURNS, "max_turn_tokens": MAX_TURN_TOKENS,
        "max_completion_length": MAX_NEW_TOKENS, "max_prompt_length": 16, "temperature": GRPO_TEMPERATURE,
        "seed": seed,
        "sample_steps": max(1, s.grpo_steps // 4), "report_to": [],
    }))
    print("[4/4] held-out evaluation of the GRPO model, with and without the calculator")
    after = held_out_eval(grpo_final, test_rows, s, seed)
    return summarise(out, before, after, s, seed, time.time() - start)


def summarise(out: Path, before: dict, after: dict, s: Size, seed: int, wall: float) -> dict:
    keys = [k for k in before if k != "examples"]
    summary = {"demo": "tools", "seed": seed, "wall_time_s": round(wall, 1), "held_out_problems": s.n_test,
               "samples_per_problem": s.eval_n, "sft": {k: before[k] for k in keys},
               "grpo": {k: after[k] for k in keys}}
    summary["accuracy_gain_points"] = round(100 * (after["accuracy_with_tool"] - before["accuracy_with_tool"]), 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [[k, before[k], after[k]] for k in keys]
    print("\n" + print_table(["held-out metric", "after SFT", "after GRPO"], rows))
    print(f"accuracy with the calculator: {summary['accuracy_gain_points']:+.1f} points   wall time: {wall:.0f} s")
    metrics = read_jsonl(out / "grpo" / "metrics.jsonl")
    images = [plot_series(out / "reward.png", "GRPO: mean reward (exact answer) per step",
                          {"reward": metric_series(metrics, "reward/math/mean")}, ylabel="mean exact-answer reward"),
              plot_series(out / "tool_call_rate.png", "episodes that call the calculator",
                          {"rate": metric_series(metrics, "episode/tool_call_rate")}, ylabel="tool-call rate")]
    samples = [{"prompt": e["prompt"], "completion": " | ".join(f"{t['role']}: {t['text']}" for t in e["episode"]),
                "reward": e["reward"]} for e in after["examples"]]
    write_html(out / "report.html", title="tether demo: learning to call a calculator with RL",
               notes=[f"seed {seed}, {s.n_test} held-out problems, "
                      f"{'greedy' if s.eval_n == 1 else f'{s.eval_n} samples each at temperature 1'}; "
                      f"wall time {summary['wall_time_s']} s"],
               tables=[("held-out results", ["metric", "after SFT", "after GRPO"], rows)],
               images=images, samples=[("held-out episodes after GRPO", samples)])
    return summary
