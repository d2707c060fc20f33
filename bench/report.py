"""results.json -> results.md: the table the README shows.

    python bench/report.py [bench/results.json]      # rewrites bench/results.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {"grpo": 2.0, "dpo": 1.5, "sft": 1.2, "generate": 2.0}
LABELS = {"sft": "SFT step", "dpo": "DPO step", "grpo": "GRPO step", "generate": "generation"}


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
        f"{report['settings']['repeats']} repeats per library, alternated; times are wall-clock, the median over "
        "repeats of each repeat's mean step time (min-max in brackets); speed-up is the median over rounds of "
        "TRL time / tether time, by wall-clock and by process CPU time (steadier when the machine is shared). "
        "Shapes and method: docs/benchmarks.md.",
        "",
        "| model | workload | tether | TRL | speed-up (target) | speed-up, CPU time | tokens/s tether / TRL "
        "| peak RSS tether / TRL | share of matmul peak tether / TRL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        t, b = r["tether"], r["trl"]
        target = TARGETS.get(r["workload"])
        ok = "" if target is None else (" ✓" if r["speedup"] >= target else " ✗")
        mem_ok = " ✓" if t["peak_rss_mb"] <= b["peak_rss_mb"] else " ✗"
        lines.append(
            f"| {r['model']} | {LABELS.get(r['workload'], r['workload'])} "
            f"| {_s(t['step_s']['median'])} [{_s(t['step_s']['min'])}-{_s(t['step_s']['max'])}] "
            f"| {_s(b['step_s']['median'])} [{_s(b['step_s']['min'])}-{_s(b['step_s']['max'])}] "
            f"| **{r['speedup']:.2f}×** (≥{target}×){ok} | {r['speedup_cpu']:.2f}× "
            f"| {t['tokens_per_s']:,.0f} / {b['tokens_per_s']:,.0f} "
            f"| {t['peak_rss_mb']:,.0f} / {b['peak_rss_mb']:,.0f} MB{mem_ok} "
            f"| {100 * t['fraction_of_matmul_peak']:.1f}% / {100 * b['fraction_of_matmul_peak']:.1f}% |")
    lines += ["", "Time per step by stage (median over repeats; \"other\" = forward passes, losses, data, "
                  "bookkeeping):", "", "| model | workload | tether | TRL |", "|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['model']} | {LABELS.get(r['workload'], r['workload'])} "
                     f"| {_stages(r['tether']['stages_s'])} | {_stages(r['trl']['stages_s'])} |")
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
