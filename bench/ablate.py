"""Measure levers one at a time: variants of tether (and TRL) side by side on one workload, interleaved.

    bench/.venv-trl/bin/python bench/ablate.py MODEL WORKLOAD VARIANT [VARIANT ...] [--repeats R] [--steps W,S]

A variant is a library, then any number of `+lever` (a module in bench/levers, patched into tether in the
measuring child: a proposed change, or an ablation `no_*` / `model_decode` that turns a kept one off) and
`@key=value` (a tether config option, value read as JSON), e.g.
    tether   tether+model_decode   tether+no_shared_prompt+model_decode   tether@length_grouping=false   trl
Rounds alternate the order of the variants. Prints per-repeat CPU and wall seconds per step and the medians,
and appends the summary to bench/out/ablations.jsonl. CPU time (this process only) is the steadier number on
a shared machine; both are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from bench import STEPS, Worker, kind_of, micro_options, shape_of  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str], dict]:
    lib, *parts = text.replace("@", "+@").split("+")
    levers, options = [], {}
    for part in parts:
        if part.startswith("@"):
            key, _, value = part[1:].partition("=")
            options[key] = json.loads(value)
        elif part:
            levers.append(part)
    return lib, levers, options


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("workload")
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", default=None, help="warmup,timed steps per repeat (default: bench.py's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tether-src", default="", help="measure the tether in this source tree")
    parser.add_argument("--out", default=str(BENCH / "out"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    import assets

    assets.build_all(out, [args.model])
    warmup, steps = (map(int, args.steps.split(",")) if args.steps else STEPS[(args.model, args.workload)])
    shape = shape_of(args.model, args.workload)
    micro = shape.pop("micro_batch_size", None)
    variants = {v: parse_variant(v) for v in args.variants}
    libs = sorted({lib for lib, _, _ in variants.values()})
    workers = {lib: Worker(lib, args.threads, out / "logs", args.tether_src) for lib in libs}
    results = {v: [] for v in variants}
    try:
        for r in range(args.repeats):
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for name in order:
                lib, levers, options = variants[name]
                job = {"lib": lib, "workload": kind_of(args.workload), "model": str(out / "models" / args.model),
                       "data_dir": str(out / "data" / args.model), "warmup": warmup, "steps": steps,
                       "threads": args.threads, "seed": 0, "levers": levers,
                       "out_dir": str(out / "runs" / f"ablate-{lib}"), "log": str(out / "logs" / f"ablate-{lib}.log"),
                       **shape}
                if micro:
                    job.update(micro_options(lib, kind_of(args.workload), shape, micro))
                if options:
                    job["tether_options"] = {**job.get("tether_options", {}), **options}
                result = workers[lib].run(job)
                if "error" in result:
                    print(f"{name} failed:\n{result['error']}", file=sys.stderr)
                    return 1
                cpu = statistics.mean(s["cpu"] for s in result["steps"])
                wall = statistics.mean(s["time"] for s in result["steps"])
                results[name].append({"cpu": cpu, "wall": wall, "rss": result["peak_rss_mb"]})
                print(f"{name:45s} cpu {cpu:8.3f} s  wall {wall:8.3f} s  peak RSS {result['peak_rss_mb']:6.0f} MB",
                      flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    base = args.variants[0]
    base_cpu = statistics.median(x["cpu"] for x in results[base])
    summary = {"model": args.model, "workload": args.workload, "repeats": args.repeats, "steps": [warmup, steps],
               "created": time.strftime("%Y-%m-%d %H:%M:%S"), "variants": {}}
    print(f"--- medians over {args.repeats} repeats; 'x base' = CPU time of {base} / CPU time of the variant")
    for name in variants:
        cpu = statistics.median(x["cpu"] for x in results[name])
        wall = statistics.median(x["wall"] for x in results[name])
        rss = statistics.median(x["rss"] for x in results[name])
        summary["variants"][name] = {"cpu_s": cpu, "wall_s": wall, "peak_rss_mb": rss, "x_base": base_cpu / cpu,
                                     "repeats": results[name]}
        print(f"{name:45s} cpu {cpu:8.3f} s  wall {wall:8.3f} s  peak RSS {rss:6.0f} MB  x base {base_cpu / cpu:5.2f}")
    with open(out / "ablations.jsonl", "a") as file:
        file.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
