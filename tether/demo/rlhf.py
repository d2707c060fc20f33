"""RLHF and DPO on the tiny model, judged by a hidden "gold" rule: reward over-optimisation in miniature.

The gold rule (`tasks.gold_reward`: +1 per good word, −1 per bad word) stands in for human judgement. It
labels the preference pairs and is used for nothing else but judging; every trainer sees only the pairs or
the reward model learned from them (the proxy), as in Gao et al. 2022, "Scaling laws for reward model
over-optimization".

1. data: demonstrations mixing good and bad words; gold-labelled pairs (1–3 word answers), held-out pairs apart;
2. SFT on the demonstrations → π_sft, also the reference π_ref;
3. reward model (Bradley-Terry) on the pairs, from π_sft's body → held-out pairwise accuracy;
4. `rlhf`: PPO and GRPO against the reward model with β·KL(π‖π_ref) in the reward, a β sweep with β = 0;
   `dpo`:  DPO on the same pairs, PPO and GRPO at one β, and best-of-N sampling from π_sft with the RM;
5. every policy (and every checkpoint of the RL runs) is judged on fresh samples: proxy reward, gold
   reward and KL from π_ref → summary.json, plots (gold and proxy against KL), report.html, a table.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tether import models
from tether.config import load_config
from tether.demo.report import metric_series, plot_series, print_table, read_jsonl, write_html, write_jsonl
from tether.demo.tasks import (TOPICS, demonstration_rows, gold_reward, is_well_formed, preference_rows,
                               topic_prompt)
from tether.data.chat import encode_prompt
from tether.models.value import RewardScorer
from tether.models.forward import model_token_logprobs
from tether.recipes import best_of_n, dpo, grpo, ppo, reward_model, sft
from tether.rollout import SamplingParams, get_sampler
from tether.runtime.checkpoint import complete_checkpoints
from tether.runtime.device import choose_device

# Weight 0: the gold reward is logged beside the proxy in metrics.jsonl and samples.jsonl, never trained on.
GOLD_LOG = {"name": "tether.demo.tasks:gold_rewards", "weight": 0.0}
MAX_NEW_TOKENS = 32  # the longest answer, " music is clear brief exact.", is 28 characters (= tokens)
PROMPT_TOKENS = 16


@dataclass
class Size:
    n_sft: int              # demonstrations
    n_pairs: int            # reward-model / DPO training pairs
    n_pairs_eval: int       # held-out pairs (none also in training)
    sft_steps: int
    rm_steps: int
    rl_steps: int
    rl_lr: float
    sweep: tuple            # rlhf: (algorithm, β) runs; β = 0 shows the over-optimisation
    dpo_beta: float         # dpo: DPO's β
    beta: float             # dpo: the β of its PPO and GRPO runs
    dpo_steps: int
    best_of_n: int          # N of best-of-N
    eval_samples: int       # fresh samples per topic prompt for each evaluation
    checkpoints: int        # evaluated points along each RL run
    group_size: int = 8     # completions per prompt per RL step (8 topic prompts per step)
    ppo_warmup_steps: int = 0  # PPO's learning-rate warm-up, in optimizer steps (4 per RL step here)
    ppo_lr: float | None = None  # PPO's learning rate (None: rl_lr)
    model: str = "tiny"


SIZES = {
    "default": Size(n_sft=400, n_pairs=500, n_pairs_eval=200, sft_steps=200, rm_steps=100, rl_steps=60, rl_lr=6e-4,
                    sweep=(("ppo", 0.05), ("ppo", 0.0), ("grpo", 0.2), ("grpo", 0.05), ("grpo", 0.01),
                           ("grpo", 0.0)),
                    beta=0.05, dpo_beta=0.5, dpo_steps=60, best_of_n=16, eval_samples=32, checkpoints=12),
    "small": Size(n_sft=300, n_pairs=300, n_pairs_eval=100, sft_steps=120, rm_steps=60, rl_steps=24, rl_lr=6e-4,
                  sweep=(("ppo", 0.05), ("grpo", 0.05), ("grpo", 0.0)), beta=0.05, dpo_beta=0.5, dpo_steps=40,
                  best_of_n=8, eval_samples=16, checkpoints=12, ppo_warmup_steps=4, ppo_lr=3e-4),
}


# ----------------------------------------------------------------------------- judging a policy


class Judge:
    """Judges a policy on fresh samples (temperature 1, `n` per topic prompt): mean proxy reward (the reward
    model), mean gold reward (the hidden rule), KL(π‖π_ref) and the share of well-formed answers.

    KL is the mean over samples of Σ_t [log π(y_t|·) − log π_ref(y_t|·)] (k1 summed over the completion):
    an unbiased estimate of the sequence KL, since the samples come from π."""

    def __init__(self, reference: Path, reward_model_dir: Path, *, n: int, seed: int):
        self.device = choose_device("auto")
        self.reference, self.tokenizer = models.load(str(reference), device=self.device)
        self.reference.eval()
        self.scorer = RewardScorer(str(reward_model_dir), device=self.device, batch_size=256)
        self.prompts = [topic_prompt(t) for t in TOPICS]
        self.prompt_ids = [encode_prompt(self.tokenizer, p, "auto") for p in self.prompts]  # as SFT tokenized them
        self.params = SamplingParams(n=n, temperature=1.0, max_new_tokens=MAX_NEW_TOKENS, seed=seed)

    @torch.no_grad()
    def __call__(self, policy: Path, *, keep: int = 0) -> dict:
        model, _ = models.load(str(policy), device=self.device)
        model.eval()
        batch = get_sampler("builtin", model, self.tokenizer).generate(self.prompt_ids, self.params)
        tensors = batch.to_tensors(self.tokenizer.pad_token_id, self.device)
        P = tensors["prompt_length"]
        ref_logprobs = model_token_logprobs(self.reference, tensors["input_ids"], tensors["attention_mask"])[0]
        ref_logprobs = ref_logprobs[:, P - 1:]  # (N, C), lines up with the sampled completion tokens
        kl = ((tensors["sampling_logprobs"] - ref_logprobs) * tensors["completion_mask"]).sum(-1)  # (N,)
        prompts = [self.prompts[i] for i in batch.prompt_index]
        proxy = self.scorer.score(prompts, batch.completions)
        gold = [gold_reward(c) for c in batch.completions]
        formed = [is_well_formed(c) for c in batch.completions]
        result = {"gold": mean(gold), "proxy": mean(proxy), "kl": float(kl.mean()), "well_formed": mean(formed),
                  "length": mean([len(ids) for ids in batch.completion_ids])}
        if keep:
            step = max(1, len(prompts) // keep)
            result["samples"] = [{"prompt": prompts[i], "completion": batch.completions[i],
                                  "reward": f"proxy {proxy[i]:.2f}, gold {gold[i]:g}"}
                                 for i in range(0, len(prompts), step)][:keep]
        return result


def mean(values: list) -> float:
    return float(sum(values) / len(values))


# ----------------------------------------------------------------------------- stages


def common(seed: int) -> dict:
    return {"seed": seed, "report_to": [], "max_length": 64}


def train_sft(out: Path, data: str, s: Size, seed: int) -> Path:
    # One forward per batch, as when docs/demo.md was measured: at this learning rate float rounding alone (a
    # different split of the batch, exact in real arithmetic) moves the SFT weights ~20% in 120 steps, and the RL
    # runs that start from them land elsewhere (docs/benchmarks.md, length grouping).
    return sft.train(load_config(sft.SFTConfig, None, {
        **common(seed), "model": s.model, "data": data, "output_dir": str(out / "sft"), "max_steps": s.sft_steps,
        "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 10, "length_grouping": False}))


def train_reward_model(out: Path, sft_final: Path, data: str, eval_data: str, s: Size, seed: int) -> tuple[Path, dict]:
    final = reward_model.train(load_config(reward_model.RewardModelConfig, None, {
        **common(seed), "model": str(sft_final), "data": data, "eval_data": eval_data,
        "output_dir": str(out / "reward_model"), "max_steps": s.rm_steps, "batch_size": 16, "learning_rate": 1e-3,
        "warmup_steps": 5}))
    return final, json.loads((out / "reward_model" / "eval.json").read_text())


def train_rl(out: Path, algorithm: str, beta: float, *, sft_final: Path, rm_final: Path, prompts: str, s: Size,
             seed: int, checkpoints: bool) -> Path:
    """PPO or GRPO against the reward model. Both put β·KL in the reward (GRPO: kl_penalty=reward), so β means
    the same in both: the runs climb the KL-regularised objective E[r_φ] − β·KL(π‖π_ref). With `checkpoints`,
    `s.checkpoints` evenly spaced checkpoints are kept for `judge_checkpoints`."""
    folder = out / f"{algorithm}_beta{beta:g}"
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # an interrupted earlier demo's; this run starts over
    keys = {**common(seed), "model": str(sft_final), "data": prompts, "output_dir": str(folder),
            "max_steps": s.rl_steps, "batch_size": len(TOPICS), "group_size": s.group_size,
            "learning_rate": s.rl_lr, "lr_scheduler": "constant", "kl_coef": beta, "kl_estimator": "k1",
            "max_completion_length": MAX_NEW_TOKENS, "max_prompt_length": PROMPT_TOKENS, "temperature": 1.0,
            "save_steps": max(1, s.rl_steps // s.checkpoints) if checkpoints else 0, "keep_last": s.checkpoints + 1,
            "sample_steps": max(1, s.rl_steps // s.checkpoints)}
    if algorithm == "ppo":  # InstructGPT: the critic starts from the reward model
        # PPO takes 4 optimizer steps per batch, each moving every weight by ~lr, the first ones while Adam's
        # moment estimates are young: at the small size, at rl_lr, that could knock π off its well-formed answers
        # and into the reward model's blind spots (gold 0.00 at KL 14.6 for seed 0 at 2 threads, fine at 1).
        # Half of rl_lr learned at every seed (0-2) and thread count (1-2) tried: gold +2.1 to +2.6 over SFT.
        return ppo.train(load_config(ppo.PPOConfig, None, {
            **keys, "learning_rate": s.ppo_lr or s.rl_lr, "reward_model": str(rm_final),
            "critic_model": str(rm_final), "rewards": [GOLD_LOG], "ppo_epochs": 2, "num_minibatches": 2,
            "warmup_steps": s.ppo_warmup_steps}))
    return grpo.train(load_config(grpo.GRPOConfig, None, {
        **keys, "rewards": [{"name": "reward_model", "path": str(rm_final), "batch_size": 256}, GOLD_LOG],
        "kl_penalty": "reward"}))


def judge_checkpoints(final: Path, steps: int, judge: Judge, start: dict) -> list[dict]:
    """The run's trajectory: π_sft (step 0) and every checkpoint (the last is the final model), judged on fresh
    samples; the last point keeps a few samples. The checkpoints are removed afterwards (final/ stays)."""
    curve = [{"step": 0, **{k: v for k, v in start.items() if k != "samples"}}]
    for checkpoint in complete_checkpoints(final.parent / "checkpoints"):
        curve.append({"step": int(checkpoint.name.removeprefix("step-")), **judge(checkpoint / "model", keep=6)})
    if curve[-1]["step"] != steps:
        curve.append({"step": steps, **judge(final, keep=6)})
    shutil.rmtree(final.parent / "checkpoints", ignore_errors=True)
    for point in curve[:-1]:
        point.pop("samples", None)
    return curve


def run_best_of_n(out: Path, sft_final: Path, rm_final: Path, s: Size, seed: int) -> dict:
    """Best-of-N from π_sft, picked by the reward model; judged by the gold rule on the picked answers."""
    rows = [{"prompt": topic_prompt(t)} for t in TOPICS for _ in range(s.eval_samples)]
    best = best_of_n.run(load_config(best_of_n.BestOfNConfig, None, {
        "model": str(sft_final), "data": write_jsonl(out / "best_of_n_prompts.jsonl", rows),
        "output_dir": str(out / "best_of_n"), "reward_model": str(rm_final), "rewards": [GOLD_LOG], "seed": seed,
        "sampling": {"n": s.best_of_n, "temperature": 1.0, "max_new_tokens": MAX_NEW_TOKENS, "batch_size": 64}}))
    picked = read_jsonl(best)
    n = s.best_of_n
    return {"gold": mean([r["rewards"]["gold_rewards"] for r in picked]),
            "proxy": mean([r["rewards"]["reward_model"] for r in picked]),
            "kl": math.log(n) - (n - 1) / n,  # the analytic KL of best-of-n (Stiennon et al. 2020), an upper bound
            "well_formed": mean([is_well_formed(r["completion"]) for r in picked]),
            "length": mean([r["completion_tokens"] for r in picked])}


# ----------------------------------------------------------------------------- the demo


def run(output_dir: str, *, seed: int = 0, size: str = "default", which: str = "rlhf", **_) -> dict:
    if which not in ("rlhf", "dpo"):
        raise ValueError(f"which must be 'rlhf' or 'dpo', got {which!r}")
    start = time.time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = SIZES[size]
    pairs = preference_rows(s.n_pairs, seed=seed)
    seen = {(r["prompt"], r["chosen"], r["rejected"]) for r in pairs}
    held_out = [r for r in preference_rows(2 * s.n_pairs_eval + 50, seed=seed + 10_000)
                if (r["prompt"], r["chosen"], r["rejected"]) not in seen][: s.n_pairs_eval]
    data = {"sft": write_jsonl(out / "sft.jsonl", demonstration_rows(s.n_sft, seed=seed + 20_000)),
            "pairs": write_jsonl(out / "pairs.jsonl", pairs),
            "pairs_eval": write_jsonl(out / "pairs_eval.jsonl", held_out),
            "prompts": write_jsonl(out / "prompts.jsonl", [{"prompt": topic_prompt(t)} for t in TOPICS])}
    stages = 4 if which == "rlhf" else 6
    print(f"[1/{stages}] SFT on {s.n_sft} demonstrations ({s.sft_steps} steps)")
    sft_final = train_sft(out, data["sft"], s, seed)
    print(f"[2/{stages}] reward model on {len(pairs)} gold-labelled pairs ({s.rm_steps} steps)")
    rm_final, rm_eval = train_reward_model(out, sft_final, data["pairs"], data["pairs_eval"], s, seed)
    judge = Judge(sft_final, rm_final, n=s.eval_samples, seed=seed)
    results = {"sft": judge(sft_final, keep=6)}
    rl_kwargs = dict(sft_final=sft_final, rm_final=rm_final, prompts=data["prompts"], s=s, seed=seed)

    if which == "rlhf":
        print(f"[3/4] PPO / GRPO against the reward model, β sweep {[f'{a} β={b:g}' for a, b in s.sweep]}")
        for algorithm, beta in s.sweep:
            final = train_rl(out, algorithm, beta, **rl_kwargs, checkpoints=True)
            curve = judge_checkpoints(final, s.rl_steps, judge, results["sft"])
            results[f"{algorithm}_beta{beta:g}"] = {"algorithm": algorithm, "beta": beta, **curve[-1],
                                                    "curve": [{k: v for k, v in p.items() if k != "samples"}
                                                              for p in curve]}
        print("[4/4] report")
    else:
        print(f"[3/6] DPO on the same {len(pairs)} pairs ({s.dpo_steps} steps)")
        dpo_final = dpo.train(load_config(dpo.DPOConfig, None, {
            **common(seed), "model": str(sft_final), "data": data["pairs"], "eval_data": data["pairs_eval"],
            "output_dir": str(out / "dpo"), "max_steps": s.dpo_steps, "batch_size": 16, "learning_rate": 3e-4,
            "beta": s.dpo_beta}))
        results["dpo"] = judge(dpo_final, keep=6)
        for stage, algorithm in ((4, "ppo"), (5, "grpo")):
            print(f"[{stage}/6] {algorithm.upper()} against the reward model, β={s.beta:g} ({s.rl_steps} steps)")
            final = train_rl(out, algorithm, s.beta, **rl_kwargs, checkpoints=False)
            results[algorithm] = {"beta": s.beta, **judge(final, keep=6)}
        print(f"[6/6] best-of-{s.best_of_n} from the SFT model, picked by the reward model")
        results[f"best_of_{s.best_of_n}"] = run_best_of_n(out, sft_final, rm_final, s, seed)

    summary = summarise(out, which, results, rm_eval, len(pairs), s, seed, size, time.time() - start)
    write_report(out, which, summary, results)
    return summary


def summarise(out: Path, which: str, results: dict, rm_eval: dict, n_pairs: int, s: Size, seed: int, size: str,
              wall: float) -> dict:
    strip = lambda r: {k: v for k, v in r.items() if k != "samples"}  # noqa: E731
    summary = {"demo": which, "seed": seed, "size": size, "wall_time_s": round(wall, 1),
               "reward_model": {"held_out_accuracy": rm_eval["accuracy"], "held_out_pairs": rm_eval["num_pairs"],
                                "train_pairs": n_pairs},
               "eval_samples": s.eval_samples * len(TOPICS), "results": {k: strip(v) for k, v in results.items()}}
    if which == "rlhf":
        summary["over_optimisation"] = {name: trajectory(r["curve"]) for name, r in results.items() if "curve" in r}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + print_table(*result_table(summary)))
    print(f"reward model held-out pairwise accuracy: {rm_eval['accuracy']:.3f} ({rm_eval['num_pairs']} pairs)   "
          f"wall time: {wall:.0f} s")
    return summary


def trajectory(curve: list[dict]) -> dict:
    """Where gold peaked along a run and what happened after: over-optimisation is proxy up, gold down."""
    peak = max(curve, key=lambda p: p["gold"])
    final = curve[-1]
    return {"peak_gold": peak["gold"], "peak_step": peak["step"], "proxy_at_peak": peak["proxy"],
            "kl_at_peak": peak["kl"], "final_gold": final["gold"], "final_proxy": final["proxy"],
            "final_kl": final["kl"], "gold_drop_from_peak": peak["gold"] - final["gold"],
            "proxy_gain_after_peak": final["proxy"] - peak["proxy"]}


def result_table(summary: dict) -> tuple[list[str], list[list]]:
    header = ["policy", "gold reward", "proxy (RM) reward", "KL from SFT", "well-formed"]
    rows = []
    for name, r in summary["results"].items():
        label = name if "beta" not in r else f"{r.get('algorithm', name)} β={r['beta']:g}"
        rows.append([label, r["gold"], r["proxy"], r["kl"], r["well_formed"]])
    return header, rows


def write_report(out: Path, which: str, summary: dict, results: dict) -> None:
    header, rows = result_table(summary)
    images, tables = [], [("gold reward (hidden rule) and proxy reward (reward model), fresh samples at T=1",
                           header, rows)]
    if which == "rlhf":
        runs = {name: r for name, r in results.items() if "curve" in r}
        label = lambda r: f"{r['algorithm']} β={r['beta']:g}"  # noqa: E731
        # Gao et al. 2022 plot reward against d = √KL(π‖π_ref), the distance the policy has moved.
        distance = lambda r: [math.sqrt(max(p["kl"], 0.0)) for p in r["curve"]]  # noqa: E731
        unpenalised = {name: r for name, r in runs.items() if r["beta"] == 0}
        images += [
            plot_series(out / "over_optimisation.png", "β = 0: the proxy keeps rising, the gold reward falls",
                        {f"{kind} ({label(r)})": (distance(r), [p[kind] for p in r["curve"]])
                         for r in unpenalised.values() for kind in ("proxy", "gold")},
                        xlabel="√KL(π ‖ π_sft)  (√nats)", ylabel="reward"),
            plot_series(out / "gold_vs_kl.png", "gold reward against distance from the SFT policy",
                        {label(r): (distance(r), [p["gold"] for p in r["curve"]]) for r in runs.values()},
                        xlabel="√KL(π ‖ π_sft)  (√nats)", ylabel="gold reward"),
            plot_series(out / "proxy_vs_kl.png", "proxy (reward-model) reward against distance",
                        {label(r): (distance(r), [p["proxy"] for p in r["curve"]]) for r in runs.values()},
                        xlabel="√KL(π ‖ π_sft)  (√nats)", ylabel="proxy reward"),
        ]
        metrics = {name: read_jsonl(out / name / "metrics.jsonl") for name in runs}
        images += [
            plot_series(out / "gold_training.png", "gold reward of the training samples",
                        {label(runs[n]): metric_series(m, "reward/gold_rewards/mean") for n, m in metrics.items()},
                        ylabel="gold reward"),
            plot_series(out / "proxy_training.png", "proxy reward of the training samples",
                        {label(runs[n]): metric_series(m, "reward/reward_model/mean") for n, m in metrics.items()},
                        ylabel="proxy reward"),
        ]
        tables.append(("over-optimisation: where gold peaked and where each run ended",
                       ["run", "peak gold", "step", "proxy at peak", "final gold", "final proxy", "final KL"],
                       [[label(runs[n]), t["peak_gold"], t["peak_step"], t["proxy_at_peak"], t["final_gold"],
                         t["final_proxy"], t["final_kl"]] for n, t in summary["over_optimisation"].items()]))
    rm = summary["reward_model"]
    notes = [f"seed {summary['seed']}, size {summary['size']}, wall time {summary['wall_time_s']} s; "
             f"each policy judged on {summary['eval_samples']} fresh samples at temperature 1",
             f"reward model: {rm['train_pairs']} gold-labelled pairs, held-out pairwise accuracy "
             f"{rm['held_out_accuracy']:.3f} on {rm['held_out_pairs']} pairs"]
    samples = [(f"samples: {name}", r["samples"]) for name, r in results.items() if r.get("samples")]
    title = ("tether demo: RLHF against a learned reward model, judged by a hidden gold rule" if which == "rlhf"
             else "tether demo: DPO, PPO, GRPO and best-of-N on the same preferences")
    write_html(out / "report.html", title=title, notes=notes, tables=tables, images=images, samples=samples)
