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

# Shapes of the work, identical for both libraries. A workload's `kind` (default: its name) is the function in
# workloads.py that runs it; the LoRA rows run the DPO and GRPO jobs with adapters.
LORA = dict(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
WORKLOADS = {
    "sft": dict(batch_size=8, learning_rate=1e-5),
    "dpo": dict(batch_size=8, learning_rate=1e-6, beta=0.1),
    "grpo": dict(prompts_per_step=8, group_size=8, max_new_tokens=64, learning_rate=1e-6, beta=0.0),
    "generate": dict(prompts_per_step=8, group_size=8, max_new_tokens=64),
    # LoRA: the reference is the policy with its adapter switched off, in both libraries (GRPO gets a KL term,
    # beta 0.04, so that the reference forward exists)
    "dpo_lora": dict(kind="dpo", batch_size=8, learning_rate=1e-5, beta=0.1, lora=LORA),
    "grpo_lora": dict(kind="grpo", prompts_per_step=8, group_size=8, max_new_tokens=64, learning_rate=1e-5,
                      beta=0.04, lora=LORA),
    # bench/gpu.sh, when vLLM is installed: tether's sampler on its vLLM engine against TRL's HF generate call
    "generate_vllm": dict(kind="generate", engine="vllm", prompts_per_step=8, group_size=8, max_new_tokens=64),
}
# The workloads each model runs (--workloads narrows them).
MODEL_WORKLOADS = {"tiny": ["sft", "dpo", "grpo", "generate"], "vocab150k": ["sft", "dpo", "grpo", "generate"],
                   "mid": ["sft", "dpo", "grpo", "generate", "dpo_lora", "grpo_lora"],
                   "qwen05b": ["sft", "dpo", "grpo", "generate", "dpo_lora", "grpo_lora", "generate_vllm"]}
# (warmup, timed steps) per repeat, by model and workload; --quick uses QUICK_STEPS and 2 repeats. A training run
# also drops its first step (it has no start mark), so warmup 0 still leaves one untimed step.
STEPS = {
    ("tiny", "sft"): (3, 10), ("tiny", "dpo"): (3, 8), ("tiny", "grpo"): (1, 3), ("tiny", "generate"): (1, 3),
    ("vocab150k", "sft"): (0, 2), ("vocab150k", "dpo"): (0, 1), ("vocab150k", "grpo"): (0, 1),
    ("vocab150k", "generate"): (1, 1),
    ("mid", "sft"): (0, 1), ("mid", "dpo"): (0, 1), ("mid", "grpo"): (0, 1), ("mid", "generate"): (1, 1),
    ("mid", "dpo_lora"): (0, 1), ("mid", "grpo_lora"): (0, 1),
    **{("qwen05b", w): (2, 5) for w in ("sft", "dpo", "dpo_lora")},
    **{("qwen05b", w): (1, 3) for w in ("grpo", "grpo_lora", "generate", "generate_vllm")},
}
QUICK_STEPS = {key: (min(warmup, 1), max(1, timed // 3)) for key, (warmup, timed) in STEPS.items()}
# Repeats per library by model, or by (model, workload) where that differs (default run; --repeats overrides,
# --quick runs 2 of the tiny model and 1 of the others). Ablation variants run in the first ABLATION_ROUNDS rounds.
# Sized so that the whole default run takes ~25 minutes on 2 idle cores.
REPEATS = {"tiny": 3, "vocab150k": 2, "mid": 3, "qwen05b": 3,
           ("mid", "grpo"): 2, ("mid", "dpo_lora"): 2, ("mid", "grpo_lora"): 2}
ABLATION_ROUNDS = 2
# Per-model overrides of WORKLOADS. The big-vocabulary model runs smaller RL shapes (TRL needs ~70 s for one
# 8 x 8 x 64 GRPO step on it), and both libraries split its GRPO batch into the same micro-batches for memory.
# The mid model runs issue 24's shapes: 4 prompts x 8 completions x 128 new tokens.
OVERRIDES = {
    ("vocab150k", "grpo"): dict(prompts_per_step=4, max_new_tokens=32, micro_batch_size=16),
    ("vocab150k", "generate"): dict(max_new_tokens=32),
    ("mid", "grpo"): dict(prompts_per_step=4, max_new_tokens=128),
    ("mid", "grpo_lora"): dict(prompts_per_step=4, max_new_tokens=128),
    ("mid", "generate"): dict(prompts_per_step=4, max_new_tokens=128),
    **{("qwen05b", w): dict(prompts_per_step=4, max_new_tokens=128)
       for w in ("grpo", "grpo_lora", "generate", "generate_vllm")},
}
# Ablation rows: tether with one kept lever turned off (a bench/levers ablation or a config key), measured in the
# same alternating rounds as the plain row and compared with that row's TRL runs, so each lever's share shows.
ABLATIONS = {
    "no shared prompt": dict(levers=["no_shared_prompt"]),  # each prompt encoded once per group / pair
    "no packing": dict(options={"padding_free": False}),  # padding-free (packed) training forward
    "no native decode": dict(levers=["model_decode"]),  # the lean decode step and its C attention
}
MODEL_ABLATIONS = {
    ("mid", "sft"): ["no packing"],
    ("mid", "dpo"): ["no shared prompt", "no packing"],
    ("mid", "grpo"): ["no shared prompt", "no packing", "no native decode"],
    ("mid", "generate"): ["no native decode"],
}


def kind_of(workload: str) -> str:
    """The workloads.py job a benchmark workload runs (dpo_lora -> dpo)."""
    return WORKLOADS[workload].get("kind", workload)


def shape_of(model: str, workload: str) -> dict:
    """The workload's shape for this model (micro_batch_size and lora, if any, included; not its kind)."""
    shape = {**WORKLOADS[workload], **OVERRIDES.get((model, workload), {})}
    shape.pop("kind", None)
    return shape


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
    """Expected tokens and model FLOPs of one step, from the data and the model (same for both libraries).

    Training is 6N per token (forward 2N, backward 4N); with LoRA adapters the frozen weights get no gradient,
    so 4N (the adapters' own FLOPs are left out, as attention scores are)."""
    from transformers import AutoConfig, AutoTokenizer

    from workloads import read_jsonl

    model_dir, data_dir = out / "models" / model, out / "data" / model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    params = parameter_count(AutoConfig.from_pretrained(model_dir))
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    shape, kind = shape_of(model, workload), kind_of(workload)
    train = (4 if shape.get("lora") else 6) * params  # FLOPs per trained token
    if kind == "sft":
        rows = read_jsonl(data_dir / "sft.jsonl")
        per_example = statistics.mean(count(r["prompt"]) + count(r["completion"]) + 1 for r in rows)
        tokens = shape["batch_size"] * per_example
        return {"tokens": tokens, "flops": train * tokens, "params": params,
                "tokens_note": "prompt + completion tokens trained on per step"}
    if kind == "dpo":
        rows = read_jsonl(data_dir / "dpo.jsonl")
        per_pair = statistics.mean(2 * count(r["prompt"]) + count(r["chosen"]) + count(r["rejected"]) + 2
                                   for r in rows)
        tokens = shape["batch_size"] * per_pair
        # policy forward + backward and reference forward (2N) over chosen and rejected sequences
        return {"tokens": tokens, "flops": (train + 2 * params) * tokens, "params": params,
                "tokens_note": "prompt + chosen + prompt + rejected tokens per step"}
    rows = read_jsonl(data_dir / "prompts.jsonl")[: shape["prompts_per_step"]]
    prompt_tokens = sum(count(r["prompt"]) for r in rows)
    new_tokens = shape["prompts_per_step"] * shape["group_size"] * shape["max_new_tokens"]
    generation_flops = 2 * params * (prompt_tokens + new_tokens)  # prefill each prompt once + decode
    if kind == "generate":
        return {"tokens": new_tokens, "flops": generation_flops, "params": params,
                "tokens_note": "generated tokens per call"}
    trained = shape["group_size"] * prompt_tokens + new_tokens  # every completion with its prompt
    flops = generation_flops + train * trained + (2 * params * trained if shape["beta"] > 0 else 0)
    return {"tokens": new_tokens, "flops": flops, "params": params,
            "tokens_note": "completion tokens sampled and trained on per step"}


def parameter_count(config) -> int:
    from transformers import AutoModelForCausalLM

    import torch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def matmul_peak(threads: int, n: int = 2048, repeats: int = 10, device: str = "cpu",
                dtype: str = "float32") -> float:
    """Best GEMM throughput (FLOP/s) at `threads` threads (CPU) or on the GPU, in `dtype`: the denominator of the
    FLOP fractions."""
    import torch

    torch.set_num_threads(threads)
    if device != "cpu":
        n = 8192
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    for _ in range(3):
        a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
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
        **({"peak_gpu_mb": statistics.median(r["peak_gpu_mb"] for r in runs)} if "peak_gpu_mb" in runs[0] else {}),
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
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (~6 minutes): tiny (2 repeats) and mid's four plain rows (1 repeat), fewer "
                             "steps, no ablations, a 15-CPU-second learning run on one seed")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both libraries (default 1: see docs/benchmarks.md)")
    parser.add_argument("--levers", default="", help="tether changes from bench/levers to patch in "
                                                       "(comma-separated): proposals, or ablations that turn a "
                                                       "kept lever off, e.g. model_decode,no_shared_prompt")
    parser.add_argument("--tether-src", default="", help="measure the tether in this source tree (e.g. a checkout "
                                                          "with a proposed patch applied) instead of the installed one")
    parser.add_argument("--repeats", type=int, default=None,
                        help="repeats per library (default: REPEATS in bench.py; quick: tiny 2, mid 1)")
    parser.add_argument("--models", default=None, help="default tiny,vocab150k,mid (on --device cuda: qwen05b)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: bf16 on the GPU for both libraries (bench/gpu.sh); no ablations, no learning run")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="workloads to run where a model has them (default: all; mid alone runs the LoRA rows)")
    parser.add_argument("--no-ablations", action="store_true", help="skip the ablation rows (mid model)")
    parser.add_argument("--no-learning", action="store_true", help="skip bench/learning.py (learning per CPU-second)")
    parser.add_argument("--out", default=str(BENCH / "out"), help="scratch folder (models, data, logs)")
    parser.add_argument("--results", default=str(BENCH / "results.json"))
    parser.add_argument("--skip-correctness", action="store_true")
    args = parser.parse_args(argv)
    args.levers = [x for x in args.levers.split(",") if x]
    cuda = args.device == "cuda"
    models = [m for m in (args.models or ("qwen05b" if cuda else "tiny,vocab150k,mid")).split(",") if m]
    dtype = "bfloat16" if cuda else "float32"
    if cuda:
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch.cuda.is_available() is False in this environment")
        args.no_ablations = args.no_learning = args.skip_correctness = True  # fp32 CPU tolerances; CPU budgets
    wanted = [w for w in args.workloads.split(",") if w]
    for name in models:
        if name not in MODEL_WORKLOADS:
            parser.error(f"--models: unknown model {name!r}; choose from {', '.join(MODEL_WORKLOADS)}")
    for name in wanted:
        if name not in WORKLOADS:
            parser.error(f"--workloads: unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    if args.quick and args.models is None and not cuda:
        models = ["tiny", "mid"]
    plan = [(m, w) for m in models for w in MODEL_WORKLOADS[m] if w in wanted
            and (WORKLOADS[w].get("engine") != "vllm" or _importable("vllm"))
            and not (args.quick and "lora" in WORKLOADS[w])]
    if args.quick:
        args.no_ablations = True
    repeats = {f"{m}/{w}": args.repeats or ((2 if m == "tiny" else 1) if args.quick else
                                            REPEATS.get((m, w), REPEATS[m])) for m, w in plan}
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)

    import assets

    assets.build_all(out, models)
    peak_before = matmul_peak(args.threads, device=args.device, dtype=dtype)
    print(f"{dtype} matmul peak ({args.device}, {args.threads} threads): {peak_before / 1e9:.1f} GFLOP/s", flush=True)

    correctness = None
    if not args.skip_correctness:
        correctness = run_correctness(out, models, args.threads, args.levers, args.tether_src)

    workers = {lib: Worker(lib, args.threads, out / "logs", args.tether_src) for lib in ("tether", "trl")}
    measured = []
    started = time.perf_counter()
    try:
        for model, workload in plan:
            ablations = [] if args.no_ablations or args.levers else MODEL_ABLATIONS.get((model, workload), [])
            measured.append((model, workload, measure(workers, model, workload, out, args,
                                                      repeats[f"{model}/{workload}"], ablations, dtype)))
    finally:
        for worker in workers.values():
            worker.close()
    peak_after = matmul_peak(args.threads, device=args.device, dtype=dtype)
    # The best observed GEMM rate is the closest to the machine's peak (a loaded machine only lowers it).
    peak = max(peak_before, peak_after)
    results = [summarize_workload(model, workload, runs, out, peak) for model, workload, runs in measured]

    learning = None
    if not args.no_learning:
        learning = run_learning(out, args.quick, args.tether_src)

    report = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["bench/run.sh", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "device": args.device, "dtype": dtype, **gpu_name(args.device),
                    "torch_threads": args.threads, "load_average": os.getloadavg(),
                    "matmul_peak_gflops": {"before": peak_before / 1e9, "after": peak_after / 1e9,
                                           "used": peak / 1e9},
                    **versions()},
        "settings": {"repeats": repeats, "quick": args.quick, "levers": args.levers,
                     "tether_src": args.tether_src,
                     "shapes": {f"{m}/{w}": shape_of(m, w) for m, w in plan},
                     "steps": {f"{m}/{w}": (QUICK_STEPS if args.quick else STEPS)[(m, w)] for m, w in plan},
                     },
        "targets": TARGETS,
        "results": results,
        "targets_met": targets_met(results),
        "learning": learning,
        "correctness": correctness,
        "wall_s": time.perf_counter() - started,
    }
    Path(args.results).write_text(json.dumps(report, indent=2) + "\n")
    import report as report_module

    markdown = report_module.render(report)
    Path(args.results).with_suffix(".md").write_text(markdown)
    print(markdown)
    return 0


# Issue 24's targets, read by the planners' check: on the mid model, TRL CPU time / tether CPU time at least
# `speedup_cpu`, and tether's peak RSS at most `memory_ratio` of TRL's.
TARGETS = {f"mid/{w}": {"speedup_cpu": 2.0, "memory_ratio": 0.5} for w in ("sft", "dpo", "grpo", "generate")}


def targets_met(results: list[dict]) -> dict:
    """{"mid/sft": {"speedup_cpu": 2.07, "memory_ratio": 0.41, "met": true}, ...} for each measured target row."""
    met = {}
    for r in results:
        target = TARGETS.get(f"{r['model']}/{r['workload']}")
        if target:
            met[f"{r['model']}/{r['workload']}"] = {
                "speedup_cpu": r["speedup_cpu"], "memory_ratio": r["memory_ratio"],
                "met": r["speedup_cpu"] >= target["speedup_cpu"] and r["memory_ratio"] <= target["memory_ratio"]}
    return met


def measure(workers: dict, model: str, workload: str, out: Path, args, repeats: int,
            ablations: list[str] = (), dtype: str = "float32") -> dict[str, list]:
    """Alternating repeats of one workload: {"tether": [child results], "trl": [...], "tether no packing": ...}.

    Each round runs tether, TRL and then the ablations (tether with one lever off; first ABLATION_ROUNDS rounds
    only); the next round runs them in the reverse order, so drifting load hits all of them alike."""
    warmup, steps = (QUICK_STEPS if args.quick else STEPS)[(model, workload)]
    shape = shape_of(model, workload)
    micro = shape.pop("micro_batch_size", None)
    job = {"workload": kind_of(workload), "model": str(out / "models" / model),
           "data_dir": str(out / "data" / model), "warmup": warmup, "steps": steps, "threads": args.threads,
           "seed": 0, "device": args.device, "dtype": dtype, **shape}
    variants = {"tether": ("tether", args.levers, {}), "trl": ("trl", [], {})}
    for name in ablations:
        variants[f"tether {name}"] = ("tether", ABLATIONS[name].get("levers", []), ABLATIONS[name].get("options", {}))
    runs = {name: [] for name in variants}
    for r in range(repeats):
        names = [n for n in variants if r < ABLATION_ROUNDS or not n.startswith("tether ")]
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            lib, levers, options = variants[name]
            lib_job = dict(job, lib=lib, out_dir=str(out / "runs" / f"{lib}-{model}-{workload}"),
                           log=str(out / "logs" / f"{lib}-{model}-{workload}.log"), levers=levers)
            if micro:
                lib_job.update(micro_options(lib, kind_of(workload), shape, micro))
            if options:
                lib_job["tether_options"] = {**lib_job.get("tether_options", {}), **options}
            result = workers[lib].run(lib_job)
            if "error" in result:
                raise RuntimeError(f"{name} {model}/{workload} failed:\n{result['error']}")
            result.update(warmup=warmup, timed_steps=steps)
            runs[name].append(result)
            mean = statistics.mean(s["time"] for s in result["steps"])
            cpu = statistics.mean(s["cpu"] for s in result["steps"])
            print(f"{model:>9} {workload:>9} repeat {r + 1}/{repeats} {name:>24}: {mean:.3f} s/step "
                  f"(CPU {cpu:.3f} s), peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return runs


def summarize_workload(model: str, workload: str, runs: dict, out: Path, peak: float) -> dict:
    warmup, steps = runs["tether"][0]["warmup"], runs["tether"][0]["timed_steps"]
    work = work_per_step(model, workload, out)
    summary = {lib: summarize(runs[lib], work, peak) for lib in ("tether", "trl")}
    memory = "peak_gpu_mb" if "peak_gpu_mb" in summary["tether"] else "peak_rss_mb"  # GPU runs: GPU memory
    paired, paired_cpu = _ratios(runs["trl"], runs["tether"])
    row = {"model": model, "workload": workload, "shape": shape_of(model, workload), "work_per_step": work,
           "warmup": warmup, "steps": steps, **summary, "speedup": statistics.median(paired),
           "speedup_per_round": paired, "speedup_cpu": statistics.median(paired_cpu),
           "speedup_cpu_per_round": paired_cpu,
           "memory_ratio": summary["tether"][memory] / summary["trl"][memory]}
    ablations = {}
    for name in runs:
        if not name.startswith("tether "):
            continue
        variant = summarize(runs[name], work, peak)
        vs_trl, vs_trl_cpu = _ratios(runs["trl"], runs[name])
        _, lever_cpu = _ratios(runs[name], runs["tether"])
        ablations[name.removeprefix("tether ")] = {
            "tether": variant, "speedup": statistics.median(vs_trl), "speedup_cpu": statistics.median(vs_trl_cpu),
            "speedup_cpu_per_round": vs_trl_cpu,
            # what the lever is worth: CPU time with it off / with it on (>1: the lever saves time)
            "lever_cpu": statistics.median(lever_cpu), "lever_cpu_per_round": lever_cpu,
            "memory_ratio": variant[memory] / summary["trl"][memory]}
    if ablations:
        row["ablations"] = ablations
    return row


def _ratios(slow: list[dict], fast: list[dict]) -> tuple[list[float], list[float]]:
    """Per round: mean step time of `slow` / that of `fast`, by wall-clock and by CPU time."""
    mean = lambda run, key: statistics.mean(s[key] for s in run["steps"])  # noqa: E731
    return ([mean(b, "time") / mean(a, "time") for a, b in zip(fast, slow)],
            [mean(b, "cpu") / mean(a, "cpu") for a, b in zip(fast, slow)])


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def gpu_name(device: str) -> dict:
    if device == "cpu":
        return {}
    import torch

    return {"gpu": torch.cuda.get_device_name(0)}


def run_learning(out: Path, quick: bool, tether_src: str = "") -> dict:
    """bench/learning.py in its own process (it starts its own measuring children); its JSON summary."""
    result_path = out / "learning.json"
    command = [sys.executable, str(BENCH / "learning.py"), "--out", str(out / "learning"), "--results",
               str(result_path)] + (["--quick"] if quick else [])
    if tether_src:
        command += ["--tether-src", tether_src]
    proc = subprocess.run(command, text=True, cwd=ROOT)
    if proc.returncode != 0 or not result_path.exists():
        print("learning.py failed; see its output above", flush=True)
        return {"error": f"bench/learning.py exited with status {proc.returncode}"}
    return json.loads(result_path.read_text())


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
