"""Learning per CPU-second: tether's GRPO against TRL's, from the same SFT'd model, for the same CPU budget.

    bench/.venv-trl/bin/python bench/learning.py [--budget 60] [--seeds 0,1,2] [--quick]
                                                 [--variants tether,trl,tether@learning_rate=2e-4]

The task (bench/learning_task.py) is sorting five digits. One SFT run of tether's tiny model (tether's SFT
recipe, a fixed recipe below) gives the starting policy; then each variant runs GRPO from that model in a
forked child (bench/worker.py) until its own process has spent `--budget` CPU-seconds in training, for each
seed. Every `budget / evals` CPU-seconds the child pauses its clock and measures exact-match accuracy on 256
held-out prompts by greedy decoding (the same Hugging Face `generate` call for both libraries, its CPU time
not counted). A variant is a library, then `@key=value` changes to the shared GRPO settings (`GRPO` below:
learning_rate, prompts, group_size, temperature, ...) for that variant only. Two children run at a time (one
torch thread each); each counts only its own CPU time, so the budget is the same however loaded the machine.

Writes the summary to --results (JSON), a table to stdout, and accuracy against CPU-seconds to --plot.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import learning_task  # noqa: E402
from report import learning_table  # noqa: E402

# The SFT recipe that makes the starting policy (tether's tiny model from its seeded random init), sized so the
# policy is right on a minority of held-out prompts: room for reinforcement to show what it buys.
SFT = dict(rows=2000, steps=150, batch_size=32, learning_rate=3e-3)
# GRPO settings shared by both libraries (a variant overrides some): prompts x group_size completions per step,
# one optimizer step per batch (on-policy), no KL term, the token-mean loss, group std with G - 1.
GRPO = dict(prompts=8, group_size=8, learning_rate=1e-4, temperature=1.0, max_new_tokens=8)
HELD_OUT, TRAIN_PROMPTS = 256, 4000
DEFAULT_VARIANTS = "tether,trl"


# ----------------------------------------------------------------------------- data and the starting model


def build_data(out: Path) -> Path:
    """SFT rows, RL prompts (with their answers) and held-out prompts, disjoint, from one seeded generator."""
    data = out / "data"
    stamp = data / "task.json"
    spec = {"digits": learning_task.DIGITS, "sft_rows": SFT["rows"], "train": TRAIN_PROMPTS, "held_out": HELD_OUT}
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return data
    data.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    held_out = learning_task.draw(rng, HELD_OUT)
    sft = learning_task.draw(rng, SFT["rows"], exclude=set(held_out))
    train = learning_task.draw(rng, TRAIN_PROMPTS, exclude=set(held_out))
    row = lambda d: {"prompt": learning_task.prompt_of(d), "answer": learning_task.answer_of(d)}  # noqa: E731
    write = lambda name, rows: (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))  # noqa: E731
    write("sft.jsonl", [{"prompt": learning_task.prompt_of(d), "completion": learning_task.answer_of(d)} for d in sft])
    write("train.jsonl", [row(d) for d in train])
    write("held_out.jsonl", [row(d) for d in held_out])
    stamp.write_text(json.dumps(spec) + "\n")
    return data


def held_out(data_dir: str) -> tuple[list[str], list[str]]:
    from workloads import read_jsonl

    rows = read_jsonl(Path(data_dir) / "held_out.jsonl")
    return [r["prompt"] for r in rows], [r["answer"] for r in rows]


def accuracy(model, tokenizer_dir: str, data_dir: str, max_new_tokens: int) -> float:
    """Exact-match accuracy of greedy answers on the held-out prompts (model restored to its mode after)."""
    import torch
    from transformers import AutoTokenizer

    prompts, answers = held_out(data_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, padding_side="left")
    was_training = model.training
    model.eval()
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return sum(learning_task.parse(t) == a for t, a in zip(texts, answers)) / len(answers)


def tether_sft_start(job: dict) -> dict:
    """The starting policy: tether's SFT recipe on the task's demonstrations; returns its held-out accuracy."""
    from transformers import AutoModelForCausalLM

    from tether.recipes import sft
    from workloads import _tether_config

    final = Path(job["model_dir"])
    config = _tether_config(sft.SFTConfig, model="tiny", data=str(Path(job["data_dir"]) / "sft.jsonl"),
                            output_dir=job["out_dir"] + "/run", max_steps=SFT["steps"],
                            batch_size=SFT["batch_size"], learning_rate=SFT["learning_rate"], seed=0,
                            report_to=[], progress=False, log_steps=10**9)
    start = time.process_time()
    sft.train(config)
    cpu = time.process_time() - start
    final.parent.mkdir(parents=True, exist_ok=True)
    source = Path(job["out_dir"]) / "run" / "final"
    model = AutoModelForCausalLM.from_pretrained(source)
    model.save_pretrained(final)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source).save_pretrained(final)
    return {"steps": [], "accuracy": accuracy(model, str(final), job["data_dir"], GRPO["max_new_tokens"]),
            "sft_cpu_s": cpu}


# ----------------------------------------------------------------------------- one GRPO run under a CPU budget


class BudgetSpent(Exception):
    """Raised at a step end once the run has spent its CPU budget (tether's loop has no stop flag)."""


class Tracker:
    """CPU-seconds spent training (evaluations excluded), with held-out accuracy every `budget / evals`."""

    def __init__(self, job: dict):
        self.job, self.budget = job, job["budget"]
        self.every = job["budget"] / job["evals"]
        self.start = None
        self.eval_cpu = 0.0
        self.next_mark = self.every
        self.step = 0
        self.points = []  # (training CPU-seconds, steps, accuracy)

    def begin(self) -> None:
        self.start = time.process_time()

    def used(self) -> float:
        return time.process_time() - self.start - self.eval_cpu

    def step_end(self, model) -> bool:
        """Count a step; evaluate at the marks. True once the budget is spent (the last point is recorded)."""
        self.step += 1
        used = self.used()
        if used < self.next_mark and used < self.budget:
            return False
        begin = time.process_time()
        acc = accuracy(model, self.job["model"], self.job["data_dir"], self.job["max_new_tokens"])
        self.eval_cpu += time.process_time() - begin
        self.points.append((used, self.step, acc))
        while self.next_mark <= used:
            self.next_mark += self.every
        return used >= self.budget

    def result(self) -> dict:
        return {"steps": [], "points": self.points, "optimizer_steps": self.step,
                "training_cpu_s": self.points[-1][0] if self.points else 0.0, "eval_cpu_s": self.eval_cpu}


def tether_learn(job: dict) -> dict:
    from tether.recipes import grpo
    from tether.runtime.run import Run
    from workloads import _tether_config

    tracker = Tracker(job)
    start, end_step = Run.start, Run.end_step

    def patched_start(self, *args, **kwargs):
        out = start(self, *args, **kwargs)
        tracker.begin()
        return out

    def patched_end_step(self, step, metrics, *, model, **kwargs):
        out = end_step(self, step, metrics, model=model, **kwargs)
        if tracker.step_end(model):
            raise BudgetSpent
        return out

    Run.start, Run.end_step = patched_start, patched_end_step
    config = _tether_config(
        grpo.GRPOConfig, model=job["model"], data=str(Path(job["data_dir"]) / "train.jsonl"),
        output_dir=job["out_dir"] + "/run", max_steps=10**6, batch_size=job["prompts"],
        group_size=job["group_size"], learning_rate=job["learning_rate"], lr_scheduler="constant",
        temperature=job["temperature"], max_completion_length=job["max_new_tokens"], kl_coef=0.0,
        rewards=[{"name": str(BENCH / "learning_task.py") + ":reward"}], advantage="grpo",
        advantage_std="sample", loss_aggregation="token_mean", seed=job["seed"], report_to=[], progress=False,
        log_steps=10**9, save_steps=0, sample_steps=0, **job.get("tether_options", {}))
    try:
        grpo.train(config)
    except BudgetSpent:
        pass
    return tracker.result()


def trl_learn(job: dict) -> dict:
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from workloads import _trl_common

    tracker = Tracker(job)

    class Budget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            tracker.begin()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if tracker.step_end(model):
                control.should_training_stop = True

    dataset = load_dataset("json", data_files=str(Path(job["data_dir"]) / "train.jsonl"), split="train")
    common = _trl_common({"warmup": 0, "steps": 10**6 - 1, "learning_rate": job["learning_rate"],
                          "seed": job["seed"], "out_dir": job["out_dir"],
                          "trl_micro_batch": job["prompts"] * job["group_size"]})
    args = GRPOConfig(num_generations=job["group_size"], max_completion_length=job["max_new_tokens"], beta=0.0,
                      temperature=job["temperature"], top_p=1.0, top_k=0, shuffle_dataset=True, **common,
                      **job.get("trl_options", {}))
    trainer = GRPOTrainer(model=job["model"], args=args, train_dataset=dataset,
                          reward_funcs=learning_task.reward)
    trainer.add_callback(Budget())
    trainer.train()
    return tracker.result()


# ----------------------------------------------------------------------------- orchestration


def parse_variant(text: str) -> tuple[str, dict]:
    """`tether@learning_rate=2e-4@group_size=16` -> ("tether", {"learning_rate": 0.0002, "group_size": 16})."""
    lib, *parts = text.split("@")
    if lib not in ("tether", "trl"):
        raise ValueError(f"variant {text!r}: start with tether or trl")
    changes = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in GRPO:
            raise ValueError(f"variant {text!r}: expected @key=value with key one of {', '.join(GRPO)}")
        changes[key] = json.loads(value)
    return lib, changes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=None, help="CPU-seconds of GRPO per run (default 60; "
                                                                    "quick 15)")
    parser.add_argument("--evals", type=int, default=6, help="held-out evaluations per run (at equal CPU steps)")
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; quick 0)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (each one torch thread)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tether-src", default="")
    parser.add_argument("--out", default=str(BENCH / "out" / "learning"))
    parser.add_argument("--results", default=str(BENCH / "out" / "learning.json"))
    parser.add_argument("--plot", default=str(BENCH / "learning.png"))
    args = parser.parse_args(argv)
    budget = args.budget or (15.0 if args.quick else 60.0)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    try:
        variants = {v: parse_variant(v) for v in args.variants.split(",") if v}
    except (ValueError, json.JSONDecodeError) as err:
        parser.error(f"--variants: {err}")
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    data = build_data(out)

    from bench import Worker

    started = time.perf_counter()
    start_dir = out / "sft-start"
    lanes = [{} for _ in range(max(1, args.parallel))]

    def worker(lane: dict, lib: str) -> Worker:
        if lib not in lane:
            lane[lib] = Worker(lib, 1, out / "logs", args.tether_src)
        return lane[lib]

    def job(lib: str, workload: str, **values) -> dict:
        return {"lib": lib, "workload": workload, "module": "learning", "threads": 1, "data_dir": str(data),
                "out_dir": str(out / "runs" / f"{workload}-{lib}-{threading.get_ident()}"),
                "log": str(out / "logs" / f"{lib}-{workload}.log"), **values}

    try:
        sft_result = worker(lanes[0], "tether").run(job("tether", "sft_start", model_dir=str(start_dir), seed=0))
        if "error" in sft_result:
            raise RuntimeError(f"the SFT start failed:\n{sft_result['error']}")
        print(f"starting policy: SFT {SFT['steps']} steps ({sft_result['sft_cpu_s']:.0f} CPU-s), held-out "
              f"accuracy {sft_result['accuracy']:.3f}", flush=True)
        # Interleave the libraries across lanes so that each run shares the machine with the other library.
        queue = [(name, seed) for seed in seeds for name in variants]
        results, lock = [], threading.Lock()

        def drain(lane: dict, index: int) -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    name, seed = queue.pop(0)
                lib, changes = variants[name]
                settings = {**GRPO, **changes}
                result = worker(lane, lib).run(job(lib, "learn", model=str(start_dir), seed=seed, budget=budget,
                                                   evals=args.evals, **settings))
                if "error" in result:
                    print(f"{name} seed {seed} failed:\n{result['error']}", file=sys.stderr, flush=True)
                    result = {"error": result["error"][-2000:]}
                else:
                    final = result["points"][-1]
                    print(f"{name:40s} seed {seed}: {result['optimizer_steps']:4d} steps in {final[0]:.0f} CPU-s, "
                          f"held-out accuracy {final[2]:.3f}", flush=True)
                with lock:
                    results.append({"variant": name, "seed": seed, "settings": settings, **result})

        threads = [threading.Thread(target=drain, args=(lane, i)) for i, lane in enumerate(lanes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for lane in lanes:
            for w in lane.values():
                w.close()
    summary = summarize(results, variants, sft_result["accuracy"])
    report = {"task": "sort five digits (bench/learning_task.py)", "budget_cpu_s": budget, "seeds": seeds,
              "evals": args.evals, "sft": {**SFT, "accuracy": sft_result["accuracy"],
                                           "cpu_s": sft_result["sft_cpu_s"]},
              "grpo": GRPO, "held_out": HELD_OUT, "summary": summary,
              "runs": sorted(results, key=lambda r: (list(variants).index(r["variant"]), r["seed"])),
              "wall_s": time.perf_counter() - started}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(report, indent=2) + "\n")
    print(learning_table(report))
    if args.plot:
        plot(report, Path(args.plot))
    return 0


def summarize(results: list[dict], variants: dict, start_accuracy: float) -> dict:
    """Per variant: final accuracy mean and spread over seeds, steps, and accuracy at each CPU mark."""
    out = {}
    for name in variants:
        runs = [r for r in results if r["variant"] == name and "points" in r and r["points"]]
        if not runs:
            out[name] = {"error": "no run finished"}
            continue
        finals = [r["points"][-1][2] for r in runs]
        steps = [r["optimizer_steps"] for r in runs]
        cpu = [r["points"][-1][0] for r in runs]
        out[name] = {"final_accuracy_mean": statistics.mean(finals), "final_accuracy": finals,
                     "final_accuracy_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                     "gain_over_sft": statistics.mean(finals) - start_accuracy,
                     "steps_mean": statistics.mean(steps), "steps": steps,
                     "steps_per_cpu_s": statistics.mean(s / c for s, c in zip(steps, cpu))}
    return out


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for index, name in enumerate(report["summary"]):
        color = f"C{index}"
        for run in (r for r in report["runs"] if r["variant"] == name and r.get("points")):
            xs = [0.0] + [p[0] for p in run["points"]]
            ys = [report["sft"]["accuracy"]] + [p[2] for p in run["points"]]
            ax.plot(xs, ys, color=color, alpha=0.8, marker=".",
                    label=name if run["seed"] == report["seeds"][0] else None)
    ax.set_xlabel("GRPO training CPU-seconds (one thread)")
    ax.set_ylabel("held-out exact-match accuracy")
    ax.set_title("Sort five digits: GRPO from the same SFT'd model")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
