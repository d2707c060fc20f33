"""Nash learning from human feedback on the tiny model: a non-transitive gold preference (rock-paper-scissors).

The hidden gold preference compares two answers jointly: rock ≻ scissors ≻ paper ≻ rock (a well-formed answer
beats a malformed one; equal styles tie). No scalar reward orders a cycle, so a Bradley-Terry reward model
must get at least one of the three match-ups wrong; a pairwise preference model need not.

1. data: demonstrations whose styles are skewed (rock 50%, paper 30%, scissors 20%), gold-labelled pairs drawn
   from that same mix (as pairs sampled from an SFT policy would be), held-out pairs apart, and a balanced set
   of the three match-ups in both orders (the "cycle" set);
2. SFT → π_sft, also the reference π_ref;
3. a reward model (`tether rm`) and a preference model (`tether pm`) of the same size on the same pairs:
   train, held-out and cycle accuracy of both;
4. GRPO against the reward model, and Nash-MD (`tether nash`) against the preference model, same β/τ and steps;
5. every policy judged on fresh samples: its style mix, and its worst case min_π' P_gold(π ≻ π') (a best
   response is a pure style, so it is exact) — the quantity the Nash policy maximises → summary.json,
   plots, report.html.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tether import models
from tether.config import load_config
from tether.data.preference import read_preference_rows
from tether.demo.report import metric_series, plot_series, print_table, write_html, write_jsonl
from tether.eval.preference_model import pairwise_results
from tether.generate import encode_prompt
from tether.models.preference import PreferenceScorer
from tether.models.value import RewardScorer
from tether.preference_game import preference_against
from tether.recipes import grpo, nash, preference_model, reward_model, sft
from tether.rollout import SamplingParams, get_sampler
from tether.runtime.device import choose_device

STYLES = ["rock", "paper", "scissors"]
BEATS = {"rock": "scissors", "scissors": "paper", "paper": "rock"}  # the gold cycle: key ≻ value
OTHER = "other"  # a malformed answer: loses to every style, ties with another malformed one
SFT_MIX = (0.5, 0.3, 0.2)
PROMPTS = [f"round {k}:" for k in range(8)]
MAX_NEW_TOKENS = 12  # " scissors." is 10 characters (= tokens) plus EOS


@dataclass
class Size:
    n_sft: int
    n_pairs: int
    n_pairs_eval: int
    sft_steps: int
    pm_steps: int
    rl_steps: int
    rl_lr: float
    beta: float             # β of GRPO's KL to π_ref
    nash_lr: float          # Nash-MD's learning rate: at rl_lr it overshoots round the cycle (docs/nash.md)
    tau: float              # τ of Nash-MD's KL to π_ref
    eval_samples: int       # fresh samples per prompt when judging
    group_size: int = 8
    model: str = "tiny"


SIZES = {
    "default": Size(n_sft=400, n_pairs=400, n_pairs_eval=150, sft_steps=120, pm_steps=80, rl_steps=60, rl_lr=5e-4,
                    beta=0.02, nash_lr=1e-4, tau=0.2, eval_samples=32),
    "small": Size(n_sft=300, n_pairs=300, n_pairs_eval=120, sft_steps=80, pm_steps=60, rl_steps=40, rl_lr=5e-4,
                  beta=0.02, nash_lr=1e-4, tau=0.2, eval_samples=24),
}


def style_of(completion: str) -> str:
    word = completion.strip().removesuffix(".")
    return word if word in STYLES and completion.strip().endswith(".") else OTHER


def gold_preference(first: str, second: str) -> float:
    """P_gold(first ≻ second) ∈ {0, 1/2, 1} from the styles of the two answers."""
    a, b = style_of(first), style_of(second)
    if a == b:
        return 0.5
    if OTHER in (a, b):
        return float(b == OTHER)
    return 1.0 if BEATS[a] == b else 0.0


def gold_matrix() -> torch.Tensor:
    """P_gold[i, j] = P(style i ≻ style j) over STYLES + [OTHER], (4, 4)."""
    answers = [f" {s}." for s in STYLES] + [" ???"]
    return torch.tensor([[gold_preference(answers[i], answers[j]) for j in range(4)] for i in range(4)],
                        dtype=torch.float64)


def answer(rng: random.Random) -> str:
    return f" {rng.choices(STYLES, weights=SFT_MIX)[0]}."


def pair_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        a, b = answer(rng), answer(rng)
        p = gold_preference(a, b)
        if p != 0.5:
            rows.append({"prompt": rng.choice(PROMPTS), "chosen": a if p == 1 else b, "rejected": b if p == 1 else a})
    return rows


def cycle_rows() -> list[dict]:
    """Each match-up once per prompt: a balanced cycle (a scalar ranking gets at most 2/3 of it)."""
    return [{"prompt": p, "chosen": f" {w}.", "rejected": f" {l}."} for p in PROMPTS for w, l in BEATS.items()]


# ----------------------------------------------------------------------------- judging


class Judge:
    """Samples a policy at T=1 (`n` per prompt) → its style mix, its gold worst case and its expected gold
    preference against every other judged policy's mix."""

    def __init__(self, tokenizer, *, n: int, seed: int):
        self.device = choose_device("auto")
        self.tokenizer = tokenizer
        self.prompt_ids = [encode_prompt(tokenizer, p, "auto") for p in PROMPTS]
        self.params = SamplingParams(n=n, temperature=1.0, max_new_tokens=MAX_NEW_TOKENS, seed=seed)

    @torch.no_grad()
    def __call__(self, policy: Path) -> dict:
        model, _ = models.load(str(policy), device=self.device)
        batch = get_sampler("builtin", model.eval(), self.tokenizer).generate(self.prompt_ids, self.params)
        styles = [style_of(c) for c in batch.completions]
        mix = torch.tensor([styles.count(s) / len(styles) for s in STYLES + [OTHER]], dtype=torch.float64)
        against = preference_against(mix.clamp_min(1e-300).log(), gold_matrix())  # (4,) P(y ≻ π)
        entropy = -float(sum(p * math.log(p) for p in mix.tolist() if p > 0))
        return {"mix": dict(zip(STYLES + [OTHER], mix.tolist())), "worst_case": 1.0 - float(against.max()),
                "best_response": (STYLES + [OTHER])[int(against.argmax())], "entropy": entropy,
                "samples": [{"prompt": PROMPTS[batch.prompt_index[i]], "completion": batch.completions[i],
                             "reward": style_of(batch.completions[i])} for i in range(0, len(styles), 24)][:8]}


def head_to_head(a: dict, b: dict) -> float:
    """P_gold(π_a ≻ π_b) = mix_aᵀ P mix_b."""
    names = STYLES + [OTHER]
    pa, pb = (torch.tensor([m["mix"][s] for s in names], dtype=torch.float64) for m in (a, b))
    return float(pa @ gold_matrix() @ pb)


# ----------------------------------------------------------------------------- stages


def common(seed: int) -> dict:
    return {"seed": seed, "report_to": [], "max_length": 64}


def rl_keys(out: Path, name: str, sft_final: Path, prompts: str, s: Size, seed: int) -> dict:
    return {**common(seed), "model": str(sft_final), "data": prompts, "output_dir": str(out / name),
            "max_steps": s.rl_steps, "batch_size": len(PROMPTS), "group_size": s.group_size,
            "learning_rate": s.rl_lr, "lr_scheduler": "constant", "kl_coef": s.beta, "kl_estimator": "k1",
            "max_completion_length": MAX_NEW_TOKENS, "max_prompt_length": 16, "temperature": 1.0,
            "sample_steps": 0}


def run(output_dir: str, *, seed: int = 0, size: str = "default", **_) -> dict:
    start = time.time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = SIZES[size]
    rng = random.Random(seed + 20_000)
    pairs = pair_rows(s.n_pairs, seed)
    data = {"sft": write_jsonl(out / "sft.jsonl", [{"prompt": rng.choice(PROMPTS), "completion": answer(rng)}
                                                    for _ in range(s.n_sft)]),
            "pairs": write_jsonl(out / "pairs.jsonl", pairs),
            "pairs_eval": write_jsonl(out / "pairs_eval.jsonl", pair_rows(s.n_pairs_eval, seed + 10_000)),
            "cycle": write_jsonl(out / "cycle.jsonl", cycle_rows()),
            "prompts": write_jsonl(out / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])}

    print(f"[1/4] SFT on {s.n_sft} demonstrations (styles rock/paper/scissors at {SFT_MIX})")
    sft_final = sft.train(load_config(sft.SFTConfig, None, {
        **common(seed), "model": s.model, "data": data["sft"], "output_dir": str(out / "sft"),
        "max_steps": s.sft_steps, "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 10}))

    stage_times = {"sft": time.time() - start}
    print(f"[2/4] reward model and preference model, same size, same {len(pairs)} gold-labelled pairs")
    pm_keys = {**common(seed), "model": str(sft_final), "data": data["pairs"], "max_steps": s.pm_steps,
               "batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 5}
    rm_final = reward_model.train(load_config(reward_model.RewardModelConfig, None, {
        **pm_keys, "output_dir": str(out / "reward_model")}))
    pm_final = preference_model.train(load_config(preference_model.PreferenceModelConfig, None, {
        **pm_keys, "output_dir": str(out / "preference_model")}))
    pm_scorer, rm_scorer = PreferenceScorer(pm_final, batch_size=128), RewardScorer(rm_final, batch_size=128)
    accuracy = {}
    for split in ("pairs", "pairs_eval", "cycle"):
        rows, _ = read_preference_rows([json.loads(x) for x in Path(data[split]).read_text().splitlines()],
                                       source=data[split], margin_column="")
        result = pairwise_results(rows, preference_model=pm_scorer, reward_model=rm_scorer)
        accuracy[split] = {k: {"accuracy": v["accuracy"], "ece": v["ece"]} for k, v in result.items()}

    stage_times["rm_pm"] = time.time() - start - sum(stage_times.values())
    print(f"[3/4] GRPO against the reward model and Nash-MD against the preference model ({s.rl_steps} steps)")
    rm_policy = grpo.train(load_config(grpo.GRPOConfig, None, {
        **rl_keys(out, "grpo_rm", sft_final, data["prompts"], s, seed), "kl_penalty": "reward",
        "rewards": [{"name": "reward_model", "path": str(rm_final), "batch_size": 256}]}))
    nash_policy = nash.train(load_config(nash.NashConfig, None, {
        **rl_keys(out, "nash", sft_final, data["prompts"], s, seed), "learning_rate": s.nash_lr, "kl_coef": s.tau,
        "preference_model": str(pm_final),
        "opponent": "geometric", "mixture_coef": 0.125, "preference_batch_size": 128}))
    stage_times["grpo_nash"] = time.time() - start - sum(stage_times.values())

    print("[4/4] judging every policy on fresh samples")
    judge = Judge(models.load_tokenizer(str(sft_final)), n=s.eval_samples, seed=seed)
    results = {"sft": judge(sft_final), "grpo_rm": judge(rm_policy), "nash": judge(nash_policy)}
    for name, r in results.items():
        r["vs"] = {other: head_to_head(r, o) for other, o in results.items() if other != name}
    stage_times["judge"] = time.time() - start - sum(stage_times.values())
    summary = summarise(out, results, accuracy, s, seed, size, time.time() - start, stage_times)
    write_report(out, summary, results)
    return summary


def summarise(out: Path, results: dict, accuracy: dict, s: Size, seed: int, size: str, wall: float,
              stage_times: dict) -> dict:
    strip = lambda r: {k: v for k, v in r.items() if k != "samples"}  # noqa: E731
    summary = {"demo": "nash", "seed": seed, "size": size, "wall_time_s": round(wall, 1),
               "stage_time_s": {k: round(v, 1) for k, v in stage_times.items()},
               "pairwise_accuracy": accuracy, "eval_samples": s.eval_samples * len(PROMPTS),
               "results": {k: strip(v) for k, v in results.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + print_table(*accuracy_table(summary)))
    print("\n" + print_table(*policy_table(summary)))
    print(f"wall time: {wall:.0f} s")
    return summary


def accuracy_table(summary: dict) -> tuple[list[str], list[list]]:
    acc = summary["pairwise_accuracy"]
    header = ["model", "train accuracy", "held-out accuracy", "cycle accuracy", "held-out ECE"]
    return header, [[label, acc["pairs"][k]["accuracy"], acc["pairs_eval"][k]["accuracy"], acc["cycle"][k]["accuracy"],
                     acc["pairs_eval"][k]["ece"]] for k, label in (("rm", "reward model (BT)"),
                                                                    ("pm", "preference model"))]


def policy_table(summary: dict) -> tuple[list[str], list[list]]:
    header = ["policy", "rock", "paper", "scissors", "other", "worst case min P(π ≻ π')", "best response",
              "vs SFT"]
    rows = []
    for name, r in summary["results"].items():
        rows.append([name, *[r["mix"][k] for k in STYLES + [OTHER]], r["worst_case"], r["best_response"],
                     r["vs"].get("sft", 0.5)])
    return header, rows


def write_report(out: Path, summary: dict, results: dict) -> None:
    images = [plot_series(out / "win_rate_training.png", "mean P_pm(y ≻ opponent) of the Nash-MD samples",
                          {"nash": metric_series(read_metrics(out / "nash"), "reward/preference_model/mean")},
                          ylabel="P(y ≻ y')"),
              plot_series(out / "rm_reward_training.png", "reward-model reward of the GRPO samples",
                          {"grpo_rm": metric_series(read_metrics(out / "grpo_rm"), "reward/reward_model/mean")},
                          ylabel="reward")]
    notes = [f"seed {summary['seed']}, size {summary['size']}, wall time {summary['wall_time_s']} s; each policy "
             f"judged on {summary['eval_samples']} fresh samples at temperature 1",
             "gold: rock ≻ scissors ≻ paper ≻ rock; worst case = 1 − max over styles y of P_gold(y ≻ π): "
             "0.5 for the uniform mix (the Nash equilibrium), 0 for a single style"]
    tables = [("pairwise accuracy, same pairs, same model size", *accuracy_table(summary)),
              ("policies: style mix and worst case under the gold preference", *policy_table(summary))]
    write_html(out / "report.html", title="tether demo: Nash learning from a non-transitive preference",
               notes=notes, tables=tables, images=images,
               samples=[(f"samples: {n}", r["samples"]) for n, r in results.items()])


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
