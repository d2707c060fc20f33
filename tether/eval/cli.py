"""`tether eval <what>`: each evaluation lives in its own module with a `main(argv) -> int`."""

from __future__ import annotations

import importlib
import sys

# `tether eval` with no sub-command (or with options first) runs the generation evaluation (pass@k, maj@k).
COMMANDS = {
    "generation": "tether.eval.generation",
    "rm": "tether.eval.reward_model",
    "pm": "tether.eval.preference_model",
    "score": "tether.eval.score",
    "winrate": "tether.eval.winrate",
}
DEFAULT = "generation"


def eval_main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help") or not argv:
        print("usage: tether eval [generation|rm|pm|score|winrate] [options]\n"
              "  generation  n samples per prompt → pass@k, maj@k, pass@1 (default)\n"
              "  rm          reward-model pairwise accuracy, margin and calibration on a preference file\n"
              "  pm          preference-model accuracy and calibration, beside a reward model (train and held-out)\n"
              "  score       score a JSONL of completions with reward functions\n"
              "  winrate     compare two models' completions with a reward model or judge\n"
              "Run `tether eval <what> --help` for its options.")
        return 0
    command, rest = (argv[0], argv[1:]) if argv[0] in COMMANDS else (DEFAULT, argv)
    module = importlib.import_module(COMMANDS[command])
    return module.main(rest) or 0


if __name__ == "__main__":
    raise SystemExit(eval_main(sys.argv[1:]))
