"""`tether generate`: sample completions for one prompt or a JSONL file of prompts, written as JSONL.

    tether generate --model tiny --prompt "2+3=" --n 4 --temperature 0.7
    tether generate --model runs/sft/final --prompts prompts.jsonl --n 8 --output samples.jsonl

Each output row is `{"prompt", "completion", "finish_reason", "index", ...}`: `index` is the sample's
number among the n of its prompt, and every other column of the input row is carried over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from tether.data.chat import encode_prompt  # noqa: F401  (re-exported: tether.generate.encode_prompt)
from tether.data.loading import DataError, load_rows
from tether.rollout import SamplingParams
from tether.rollout.factory import shared_sampler
from tether.runtime import distributed
from tether.runtime.options import parse_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether generate", description="Sample completions from a model.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder, hub name, or 'tiny'")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt (text)")
    source.add_argument("--prompts", help="JSONL (or any tether data file) with a 'prompt' field per row: "
                                          "a string or a message list")
    parser.add_argument("--n", "--num-samples", dest="n", type=int, default=1,
                        help="samples per prompt (under torchrun write --num-samples: torchrun reads --n as its own)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x top probability (0 = off)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per completion")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable); cut from the text")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--chat-template", choices=("auto", "always", "never"), default="auto",
                        help="auto: message lists use the chat template, strings are used as they are; "
                             "always: strings become one user message; never: no template")
    parser.add_argument("--output", help="output JSONL file (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per forward pass (each with n samples)")
    parser.add_argument("--rollout-engine", "--engine", dest="rollout_engine", choices=("builtin", "vllm"),
                        default="builtin", help="sampling engine, as rollout_engine in the recipes' configs")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    return parser


def read_prompt_rows(args) -> tuple[list[dict], str]:
    if args.prompt is not None:
        return [{"prompt": args.prompt}], "--prompt"
    rows = load_rows(args.prompts)
    for i, row in enumerate(rows):
        prompt = row.get("prompt")
        if not isinstance(prompt, (str, list)) or not prompt:
            raise DataError(args.prompts, "expected a non-empty string or message list", i, "prompt")
    return rows, args.prompts


def generate_main(argv: list[str]) -> int:
    args = parse_args(build_parser(), argv)
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                                max_new_tokens=args.max_new_tokens, n=args.n, stop=args.stop, seed=args.seed)
    except ValueError as err:
        print(f"tether generate: {err}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("tether generate: --batch-size must be >= 1", file=sys.stderr)
        return 2

    from tether.models import load
    from tether.runtime.device import choose_device, choose_dtype

    try:
        rows, source = read_prompt_rows(args)
    except DataError as err:
        print(f"tether generate: {err}", file=sys.stderr)
        return 2
    distributed.init()  # under torchrun: the ranks share the batches out
    device = choose_device(args.device)
    model, tokenizer = load(args.model, dtype=choose_dtype(args.dtype, device), device=device)
    try:
        prompt_ids = [encode_prompt(tokenizer, row["prompt"], args.chat_template) for row in rows]
    except ValueError as err:
        print(f"tether generate: {source}: {err}", file=sys.stderr)
        return 2
    sampler = shared_sampler(args.rollout_engine, model, tokenizer, batch_size=args.batch_size)

    def sampled_batches(share: range):
        """The output rows of each batch of `args.batch_size` prompts in `share`, batch by batch. Batch b samples
        with seed `seed + b`: the same command gives the same file (on any number of ranks); another
        --batch-size gives other samples."""
        for start in range(share.start, share.stop, args.batch_size):
            batch_rows = rows[start:start + args.batch_size]
            batch_params = dataclasses.replace(params, seed=params.seed + start // args.batch_size)
            batch = sampler.generate(prompt_ids[start:start + args.batch_size], batch_params)
            yield [{**batch_rows[i], "completion": completion, "finish_reason": reason, "index": index}
                   for completion, reason, i, index in zip(batch.completions, batch.finish_reasons,
                                                          batch.prompt_index, batch.sample_index)]

    if distributed.world_size() > 1:  # torchrun: each rank samples whole batches; rank 0 writes them in order
        mine = [row for batch in sampled_batches(distributed.shard_chunks(len(rows), args.batch_size)) for row in batch]
        batches = [distributed.gather_lists(mine)]
        if not distributed.is_main():
            return 0
    else:  # one process: rows are written as each batch is ready
        batches = sampled_batches(range(len(rows)))
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for batch in batches:
            for row in batch:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    return 0

if __name__ == "__main__":
    sys.exit(generate_main(sys.argv[1:]))
