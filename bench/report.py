"""results.json -> results.md: the table the README shows.

    python bench/report.py [bench/results.json]      # rewrites bench/results.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = {"sft": "SFT step", "dpo": "DPO step", "grpo": "GRPO step", "generate": "generation",
          "dpo_lora": "DPO step, LoRA", "grpo_lora": "GRPO step, LoRA"}


def _s(x: float) -> str:
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _stages(stages: dict) -> str:
    return ", ".join(f"{k} {_s(v)}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1]) if v >= 0.0005)


def render(report: dict) -> str:
    m = report["machine"]
    peak = m["matmul_peak_gflops"]
    lines = [
        "# tether vs TRL: side-by-side benchmark",
        "",
        f"Measured {report['created']} with `{report['command']}`: {m['cpus']} CPUs ({m['cpu']}), "
        f"{m['torch_threads']} torch threads for both libraries, load average at the end "
        f"{', '.join(f'{x:.1f}' for x in m['load_average'])}; torch {m['torch']}, transformers {m['transformers']}, "
        f"TRL {m['trl']}, tether {m['tether_commit']}{_variant(report)}. fp32 matmul peak {peak['before']:.0f} / "
        f"{peak['after']:.0f} GFLOP/s (start / end; the higher one is the denominator). "
        f"Repeats per library: {_repeats(report)}, alternated; times are wall-clock, the median over "
        "repeats of each repeat's mean step time (min-max in brackets); speed-up is the median over rounds of "
        "TRL time / tether time, by wall-clock and by process CPU time (steadier when the machine is shared). "
        "Shapes and method: docs/benchmarks.md.",
        "",
        "| model | workload | tether | TRL | speed-up | speed-up, CPU time (target) | CPU ratio per round "
        "| tokens/s tether / TRL | peak RSS tether / TRL (target) | share of matmul peak tether / TRL |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    targets = report.get("targets", {})
    for r in report["results"]:
        t, b = r["tether"], r["trl"]
        target = targets.get(f"{r['model']}/{r['workload']}")
        speed_target = mem_target = ""
        if target:
            fast, lean = r["speedup_cpu"] >= target["speedup_cpu"], r["memory_ratio"] <= target["memory_ratio"]
            speed_target = f" (≥{target['speedup_cpu']}×) {'✓' if fast else '✗'}"
            mem_target = f" (≤{target['memory_ratio']}) {'✓' if lean else '✗'}"
        rounds = r["speedup_cpu_per_round"]
        lines.append(
            f"| {r['model']} | {LABELS.get(r['workload'], r['workload'])} "
            f"| {_s(t['step_s']['median'])} [{_s(t['step_s']['min'])}-{_s(t['step_s']['max'])}] "
            f"| {_s(b['step_s']['median'])} [{_s(b['step_s']['min'])}-{_s(b['step_s']['max'])}] "
            f"| {r['speedup']:.2f}× | **{r['speedup_cpu']:.2f}×**{speed_target} "
            f"| {min(rounds):.2f}-{max(rounds):.2f}× "
            f"| {t['tokens_per_s']:,.0f} / {b['tokens_per_s']:,.0f} "
            f"| {_memory(t, b)} = {r['memory_ratio']:.2f}{mem_target} "
            f"| {100 * t['fraction_of_matmul_peak']:.1f}% / {100 * b['fraction_of_matmul_peak']:.1f}% |")
    ablated = [r for r in report["results"] if r.get("ablations")]
    if ablated:
        lines += ["", "Ablations: tether with one kept lever turned off, measured in the same alternating rounds "
                      "(\"lever worth\" = CPU time with the lever off / with it on, median over rounds):", "",
                  "| model | workload | lever off | tether CPU s/step | speed-up vs TRL, CPU time | lever worth "
                  "| peak RSS |", "|---|---|---|---|---|---|---|"]
        for r in ablated:
            base = r["tether"]["cpu_s"]["median"]
            lines.append(f"| {r['model']} | {LABELS.get(r['workload'], r['workload'])} | none (tether as shipped) "
                         f"| {_s(base)} | {r['speedup_cpu']:.2f}× | – | {r['tether']['peak_rss_mb']:,.0f} MB |")
            for name, a in r["ablations"].items():
                lines.append(f"| {r['model']} | {LABELS.get(r['workload'], r['workload'])} | {name} "
                             f"| {_s(a['tether']['cpu_s']['median'])} | {a['speedup_cpu']:.2f}× "
                             f"| {a['lever_cpu']:.2f}× | {a['tether']['peak_rss_mb']:,.0f} MB |")
    lines += ["", "Time per step by stage (median over repeats; \"other\" = forward passes, losses, data, "
                  "bookkeeping):", "", "| model | workload | tether | TRL |", "|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['model']} | {LABELS.get(r['workload'], r['workload'])} "
                     f"| {_stages(r['tether']['stages_s'])} | {_stages(r['trl']['stages_s'])} |")
    learning = report.get("learning")
    if learning:
        lines += ["", "## Learning per CPU-second (bench/learning.py)", ""]
        if "error" in learning:
            lines.append(f"- could not run: {learning['error']}")
        else:
            lines.append(learning_table(learning))
    c = report.get("correctness")
    if c:
        lines += ["", "Correctness on identical batches (same model, same tokens; max absolute difference):", ""]
        if "error" in c:
            lines.append(f"- could not run: `{c['error'].strip().splitlines()[-1]}`")
        for check in c.get("checks", []):
            mark = "✓" if check["passed"] else "✗"
            lines.append(f"- {mark} {check['model']}: {check['name']}: {check['max_abs_diff']:.2e} "
                         f"(tolerance {check['tolerance']:.0e})")
    lines += ["", f"Peak RSS is each forked child's `ru_maxrss` (the library's imports included: after imports "
                  f"tether {_rss(report, 'tether')}, TRL {_rss(report, 'trl')}).", ""]
    return "\n".join(lines)


def learning_table(learning: dict) -> str:
    """The learning benchmark's table: steps and held-out accuracy per variant after the same CPU budget."""
    lines = [f"Task: {learning['task']}. GRPO for {learning['budget_cpu_s']:.0f} training CPU-seconds per run "
             f"(one thread) from the same SFT'd tiny model (held-out accuracy {learning['sft']['accuracy']:.3f}), "
             f"seeds {', '.join(map(str, learning['seeds']))}; accuracy: exact answers on "
             f"{learning['held_out']} held-out prompts, greedy.", "",
             "| variant | optimizer steps | steps / CPU-s | held-out accuracy, mean ± sd | per seed |",
             "|---|---|---|---|---|"]
    for name, s in learning["summary"].items():
        if "error" in s:
            lines.append(f"| {name} | – | – | {s['error']} | |")
            continue
        lines.append(f"| {name} | {s['steps_mean']:.0f} | {s['steps_per_cpu_s']:.2f} "
                     f"| {s['final_accuracy_mean']:.3f} ± {s['final_accuracy_sd']:.3f} "
                     f"| {', '.join(f'{a:.3f}' for a in s['final_accuracy'])} |")
    return "\n".join(lines) + "\n"


def _memory(t: dict, b: dict) -> str:
    """Peak RSS, tether / TRL; on a GPU run the peak GPU memory allocated is added."""
    text = f"{t['peak_rss_mb']:,.0f} / {b['peak_rss_mb']:,.0f} MB"
    if "peak_gpu_mb" in t and "peak_gpu_mb" in b:
        text += f" (GPU {t['peak_gpu_mb']:,.0f} / {b['peak_gpu_mb']:,.0f} MB)"
    return text


def _repeats(report: dict) -> str:
    repeats = report["settings"]["repeats"]
    return ", ".join(f"{k} {v}" for k, v in repeats.items()) if isinstance(repeats, dict) else str(repeats)


def _variant(report: dict) -> str:
    settings = report["settings"]
    parts = []
    if settings.get("tether_src"):
        parts.append(f"from `{settings['tether_src']}`")
    if settings.get("levers"):
        parts.append(f"with levers {', '.join(settings['levers'])} (bench/levers)")
    return f" ({'; '.join(parts)})" if parts else ""


def _rss(report: dict, lib: str) -> str:
    values = [r[lib]["rss_after_imports_mb"] for r in report["results"]]
    return f"{min(values):.0f} MB" if values else "n/a"


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results.json")
    report = json.loads(path.read_text())
    path.with_suffix(".md").write_text(render(report))
