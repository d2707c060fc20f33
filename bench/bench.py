"""tether vs TRL on identical work, side by side: writes bench/results.json and bench/results.md.

    bash bench/run.sh [--quick] [--threads N] [--repeats R] [--models tiny,vocab150k]
                      [--workloads sft,dpo,grpo,generate] [--tether-src DIR] [--levers a,b]

Method (details in docs/benchmarks.md):
- one fork server per library (worker.py); every measurement is a fresh forked child, so each has its own
  clean peak RSS; repeats alternate the two libraries (tether, TRL, TRL, tether, tether, ...) so machine-load
  drift hits both alike;
- a repeat runs `warmup + steps` steps and reports the mean time of the `steps` timed steps; the table gives the
  median over repeats with min and max, and the speed-up as the median of per-round ratios TRL / tether;
- model FLOPs use the 6·N·tokens (training) and 2·N·tokens (forward only, generation) approximation, with N the
  parameters used in matmuls per token (all of them here: both models tie their embeddings), divided by this
  machine's measured fp32 matmul peak at the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

# Shapes of the work, identical for both libraries.
WORKLOADS = {
    "sft": dict(batch_size=8, learning_rate=1e-5),
    "dpo": dict(batch_size=8, learning_rate=1e-6, beta=0.1),
    "grpo": dict(prompts_per_step=8, group_size=8, max_new_tokens=64, learning_rate=1e-6, beta=0.0),
    "generate": dict(prompts_per_step=8, group_size=8, max_new_tokens=64),
}
# (warmup, timed steps) per repeat, by model and workload; --quick uses QUICK_STEPS and 2 repeats. A training run
# also drops its first step (it has no start mark), so warmup 0 still leaves one untimed step.
STEPS = {
    ("tiny", "sft"): (3, 10), ("tiny", "dpo"): (3, 8), ("tiny", "grpo"): (1, 3), ("tiny", "generate"): (1, 3),
    ("vocab150k", "sft"): (0, 2), ("vocab150k", "dpo"): (0, 1), ("vocab150k", "grpo"): (0, 1),
    ("vocab150k", "generate"): (1, 1),
}
QUICK_STEPS = {key: (min(warmup, 1), max(1, timed // 3)) for key, (warmup, timed) in STEPS.items()}
# Per-model overrides of WORKLOADS. The big-vocabulary model runs smaller RL shapes (TRL needs ~70 s for one
# 8 x 8 x 64 GRPO step on it), and both libraries split its GRPO batch into the same micro-batches for memory.
OVERRIDES = {
    ("vocab150k", "grpo"): dict(prompts_per_step=4, max_new_tokens=32, micro_batch_size=16),
    ("vocab150k", "generate"): dict(max_new_tokens=32),
}


def shape_of(model: str, workload: str) -> dict:
    """The workload's shape for this model (micro_batch_size, if any, included)."""
    return {**WORKLOADS[workload], **OVERRIDES.get((model, workload), {})}


# ----------------------------------------------------------------------------- workers


class Worker:
    """A fork server (worker.py) for one library."""

    def __init__(self, lib: str, threads: int, log_dir: Path, tether_src: str = ""):
        env = bench_env(threads, tether_src if lib == "tether" else "")
        self.lib = lib
        self.stderr = open(log_dir / f"worker-{lib}.log", "a")
        self.proc = subprocess.Popen([sys.executable, str(BENCH / "worker.py"), lib], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env, cwd=ROOT)
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError(f"the {lib} worker did not start; see {self.stderr.name}")

    def run(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.lib} worker died; see {self.stderr.name}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.stderr.close()


def bench_env(threads: int, tether_src: str = "") -> dict:
    """Environment of the measuring processes: thread counts, offline, quiet; `tether_src` (a checkout) is
    put first on the path, so that tree's tether is measured instead of the installed one."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    if tether_src:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(tether_src).resolve()), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep)
    return env


# ----------------------------------------------------------------------------- work accounting


def work_per_step(model: str, workload: str, out: Path) -> dict:
    """Expected tokens and model FLOPs of one step, from the data and the model (same for both libraries)."""
    from transformers import AutoConfig, AutoTokenizer

    from workloads import read_jsonl

    model_dir, data_dir = out / "models" / model, out / "data" / model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    params = parameter_count(AutoConfig.from_pretrained(model_dir))
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    shape = shape_of(model, workload)
    if workload == "sft":
        rows = read_jsonl(data_dir / "sft.jsonl")
        per_example = statistics.mean(count(r["prompt"]) + count(r["completion"]) + 1 for r in rows)
        tokens = shape["batch_size"] * per_example
        return {"tokens": tokens, "flops": 6 * params * tokens, "params": params,
                "tokens_note": "prompt + completion tokens trained on per step"}
    if workload == "dpo":
        rows = read_jsonl(data_dir / "dpo.jsonl")
        per_pair = statistics.mean(2 * count(r["prompt"]) + count(r["chosen"]) + count(r["rejected"]) + 2
                                   for r in rows)
        tokens = shape["batch_size"] * per_pair
        # policy forward + backward (6N) and reference forward (2N) over chosen and rejected sequences
        return {"tokens": tokens, "flops": 8 * params * tokens, "params": params,
                "tokens_note": "prompt + chosen + prompt + rejected tokens per step"}
    rows = read_jsonl(data_dir / "prompts.jsonl")[: shape["prompts_per_step"]]
    prompt_tokens = sum(count(r["prompt"]) for r in rows)
    new_tokens = shape["prompts_per_step"] * shape["group_size"] * shape["max_new_tokens"]
    generation_flops = 2 * params * (prompt_tokens + new_tokens)  # prefill each prompt once + decode
    if workload == "generate":
        return {"tokens": new_tokens, "flops": generation_flops, "params": params,
                "tokens_note": "generated tokens per call"}
    trained = shape["group_size"] * prompt_tokens + new_tokens  # every completion with its prompt
    flops = generation_flops + 6 * params * trained + (2 * params * trained if shape["beta"] > 0 else 0)
    return {"tokens": new_tokens, "flops": flops, "params": params,
            "tokens_note": "completion tokens sampled and trained on per step"}


def parameter_count(config) -> int:
    from transformers import AutoModelForCausalLM

    import torch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def matmul_peak(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """Best fp32 GEMM throughput (FLOP/s) at `threads` threads: the denominator of the FLOP fractions."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ----------------------------------------------------------------------------- summary


def summarize(runs: list[dict], work: dict, peak: float) -> dict:
    """Median / min / max over repeats of the per-repeat mean step time, and what follows from it."""
    times = [statistics.mean(s["time"] for s in r["steps"]) for r in runs]
    cpu_times = [statistics.mean(s["cpu"] for s in r["steps"]) for r in runs]
    median = statistics.median(times)
    stage_names = sorted({k for r in runs for s in r["steps"] for k in s["stages"]})
    stages = {}
    for name in stage_names:
        per_repeat = [statistics.mean(s["stages"].get(name, 0.0) for s in r["steps"]) for r in runs]
        stages[name] = statistics.median(per_repeat)
    stages["other"] = max(median - sum(stages.values()), 0.0)
    return {
        "step_s": {"median": median, "min": min(times), "max": max(times), "repeats": times},
        "cpu_s": {"median": statistics.median(cpu_times), "min": min(cpu_times), "max": max(cpu_times),
                  "repeats": cpu_times},
        "tokens_per_s": work["tokens"] / median,
        "stages_s": stages,
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "rss_after_imports_mb": statistics.median(r["rss_start_mb"] for r in runs),
        "model_flops_per_s": work["flops"] / median,
        "fraction_of_matmul_peak": work["flops"] / median / peak,
    }


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "accelerate", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        out["tether_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                              capture_output=True).stdout.strip()
    except OSError:
        out["tether_commit"] = None
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repeats, fewer steps (2-3 minutes)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both libraries (default 1: see docs/benchmarks.md)")
    parser.add_argument("--levers", default="", help="tether changes from bench/levers to patch in "
                                                       "(comma-separated): proposals, or ablations that turn a "
                                                       "kept lever off, e.g. model_decode,no_shared_prompt")
    parser.add_argument("--tether-src", default="", help="measure the tether in this source tree (e.g. a checkout "
                                                          "with a proposed patch applied) instead of the installed one")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per library (default 5; quick 2)")
    parser.add_argument("--models", default="tiny,vocab150k")
    parser.add_argument("--workloads", default="sft,dpo,grpo,generate")
    parser.add_argument("--out", default=str(BENCH / "out"), help="scratch folder (models, data, logs)")
    parser.add_argument("--results", default=str(BENCH / "results.json"))
    parser.add_argument("--skip-correctness", action="store_true")
    args = parser.parse_args(argv)
    args.levers = [x for x in args.levers.split(",") if x]
    repeats = args.repeats or (2 if args.quick else 5)
    models = [m for m in args.models.split(",") if m]
    workloads = [w for w in args.workloads.split(",") if w]
    if args.quick:
        models = [m for m in models if m == "tiny"] or models[:1]
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)

    import assets

    assets.build_all(out, models)
    peak_before = matmul_peak(args.threads)
    print(f"fp32 matmul peak at {args.threads} threads: {peak_before / 1e9:.1f} GFLOP/s", flush=True)

    correctness = None
    if not args.skip_correctness:
        correctness = run_correctness(out, models, args.threads, args.levers, args.tether_src)

    workers = {lib: Worker(lib, args.threads, out / "logs", args.tether_src) for lib in ("tether", "trl")}
    measured = []
    started = time.perf_counter()
    try:
        for model in models:
            for workload in workloads:
                measured.append((model, workload, measure(workers, model, workload, out, args, repeats)))
    finally:
        for worker in workers.values():
            worker.close()
    peak_after = matmul_peak(args.threads)
    # The best observed GEMM rate is the closest to the machine's peak (a loaded machine only lowers it).
    peak = max(peak_before, peak_after)
    results = [summarize_workload(model, workload, runs, out, peak) for model, workload, runs in measured]

    report = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["bench/run.sh", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "torch_threads": args.threads, "load_average": os.getloadavg(),
                    "matmul_peak_gflops": {"before": peak_before / 1e9, "after": peak_after / 1e9,
                                           "used": peak / 1e9},
                    **versions()},
        "settings": {"repeats": repeats, "quick": args.quick, "levers": args.levers,
                     "tether_src": args.tether_src,
                     "shapes": {f"{m}/{w}": shape_of(m, w) for m in models for w in workloads},
                     "steps": {f"{m}/{w}": (QUICK_STEPS if args.quick else STEPS)[(m, w)]
                               for m in models for w in workloads},
                     },
        "results": results,
        "correctness": correctness,
        "wall_s": time.perf_counter() - started,
    }
    Path(args.results).write_text(json.dumps(report, indent=2) + "\n")
    import report as report_module

    markdown = report_module.render(report)
    Path(args.results).with_suffix(".md").write_text(markdown)
    print(markdown)
    return 0


def measure(workers: dict, model: str, workload: str, out: Path, args, repeats: int) -> dict[str, list]:
    """Alternating repeats of one workload: {"tether": [child results], "trl": [...]}."""
    warmup, steps = (QUICK_STEPS if args.quick else STEPS)[(model, workload)]
    shape = shape_of(model, workload)
    micro = shape.pop("micro_batch_size", None)
    job = {"workload": workload, "model": str(out / "models" / model), "data_dir": str(out / "data" / model),
           "warmup": warmup, "steps": steps, "threads": args.threads, "seed": 0, **shape}
    runs = {"tether": [], "trl": []}
    for r in range(repeats):
        order = ["tether", "trl"] if r % 2 == 0 else ["trl", "tether"]
        for lib in order:
            lib_job = dict(job, lib=lib, out_dir=str(out / "runs" / f"{lib}-{model}-{workload}"),
                           log=str(out / "logs" / f"{lib}-{model}-{workload}.log"),
                           levers=args.levers if lib == "tether" else [])
            if micro:
                lib_job.update(micro_options(lib, workload, shape, micro))
            result = workers[lib].run(lib_job)
            if "error" in result:
                raise RuntimeError(f"{lib} {model}/{workload} failed:\n{result['error']}")
            result.update(warmup=warmup, timed_steps=steps)
            runs[lib].append(result)
            mean = statistics.mean(s["time"] for s in result["steps"])
            cpu = statistics.mean(s["cpu"] for s in result["steps"])
            print(f"{model:>9} {workload:>8} repeat {r + 1}/{repeats} {lib:>6}: {mean:.3f} s/step "
                  f"(CPU {cpu:.3f} s), peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return runs


def summarize_workload(model: str, workload: str, runs: dict, out: Path, peak: float) -> dict:
    warmup, steps = runs["tether"][0]["warmup"], runs["tether"][0]["timed_steps"]
    work = work_per_step(model, workload, out)
    summary = {lib: summarize(runs[lib], work, peak) for lib in runs}
    mean = lambda run, key: statistics.mean(s[key] for s in run["steps"])  # noqa: E731
    paired = [mean(b, "time") / mean(a, "time") for a, b in zip(runs["tether"], runs["trl"])]
    paired_cpu = [mean(b, "cpu") / mean(a, "cpu") for a, b in zip(runs["tether"], runs["trl"])]
    return {"model": model, "workload": workload, "shape": shape_of(model, workload), "work_per_step": work,
            "warmup": warmup, "steps": steps, **summary, "speedup": statistics.median(paired),
            "speedup_per_round": paired, "speedup_cpu": statistics.median(paired_cpu),
            "speedup_cpu_per_round": paired_cpu,
            "memory_ratio": summary["tether"]["peak_rss_mb"] / summary["trl"]["peak_rss_mb"]}


def micro_options(lib: str, workload: str, shape: dict, micro: int) -> dict:
    """The same micro-batching in both libraries' own terms."""
    if lib == "tether":
        return {"tether_options": {"micro_batch_size": micro}}
    if workload == "grpo":
        total = shape["prompts_per_step"] * shape["group_size"]
        return {"trl_micro_batch": micro, "trl_accumulation": total // micro}
    return {"trl_micro_batch": micro, "trl_accumulation": shape["batch_size"] // micro}


def run_correctness(out: Path, models: list[str], threads: int, levers: list[str], tether_src: str = "") -> dict:
    env = bench_env(threads, tether_src)
    proc = subprocess.run([sys.executable, str(BENCH / "correctness.py"), str(out), *models,
                           "--levers", ",".join(levers)], text=True,
                          capture_output=True, env=env, cwd=ROOT)
    (out / "logs" / "correctness.log").write_text(proc.stderr)
    if proc.returncode != 0:
        print(f"correctness checks failed to run; see {out / 'logs' / 'correctness.log'}", flush=True)
        return {"error": proc.stderr[-2000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"correctness: {'all within tolerance' if result['passed'] else 'MISMATCH'}", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
