"""`tether demo`: the whole pipeline on the built-in tiny model, on this CPU, with measured learning.

    tether demo            # rlvr: cold-start SFT → pass@1/maj@k → GRPO (exact answer + format) → again
    tether demo rlhf       # reward model on gold-labelled pairs → PPO/GRPO vs. the learned reward, β sweep
    tether demo dpo        # DPO on the same preferences; gold reward of SFT, DPO, PPO, GRPO and best-of-N
    tether demo tools      # multiplication with a calculator tool: cold-start SFT → GRPO on episodes learns to call it
    tether demo nash       # non-transitive gold preference: reward model vs preference model, GRPO vs Nash-MD
"""

from __future__ import annotations

import argparse
import importlib

from tether.runtime.options import parse_args

DEMOS = {"rlvr": "tether.demo.rlvr", "rlhf": "tether.demo.rlhf", "dpo": "tether.demo.rlhf",
         "nash": "tether.demo.nash", "tools": "tether.demo.tools"}


def demo_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tether demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", default="rlvr", choices=sorted(DEMOS), help="which demo (default rlvr)")
    parser.add_argument("--output-dir", default=None, help="run folder (default runs/demo-<which>)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, model init and sampling")
    parser.add_argument("--size", choices=["default", "small"], default="default",
                        help="small: a reduced run used by the tests (seconds, not minutes)")
    args = parse_args(parser, argv)
    module = importlib.import_module(DEMOS[args.which])
    output_dir = args.output_dir or f"runs/demo-{args.which}"
    summary = module.run(output_dir, seed=args.seed, size=args.size, which=args.which)
    print(f"\nreport: {output_dir}/report.html   summary: {output_dir}/summary.json")
    return 0 if summary else 1
