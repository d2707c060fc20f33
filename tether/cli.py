"""The `tether` command: one subcommand per recipe, plus demo, eval, generate and pipeline.

    tether sft --config run.yaml learning_rate=3e-4 lora.r=8
    tether sft --help
"""

from __future__ import annotations

import importlib
import logging
import sys

from tether.annotate.store import StoreError
from tether.config import ConfigError, check_data_files, config_help, load_config
from tether.data.loading import DataError
from tether.rewards import (RewardContractError, RewardFunctionError, RewardSetupError, RewardSpecError,
                            RewardTimeoutError)

# subcommand → "module:ConfigClass:train_function": the config (tether.config.<module>, plain Python) is
# loaded and validated first, so a config error appears before torch is imported; the recipe
# (tether.recipes.<module>) is imported only once the config is good.
RECIPES = {
    "sft": "sft:SFTConfig:train",
    "rm": "reward_model:RewardModelConfig:train",
    "pm": "preference_model:PreferenceModelConfig:train",
    "dpo": "dpo:DPOConfig:train",
    "grpo": "grpo:GRPOConfig:train",
    "ppo": "ppo:PPOConfig:train",
    "best-of-n": "best_of_n:BestOfNConfig:run",
    "rft": "rft:RFTConfig:train",
    "distill": "distill:DistillConfig:train",
    "nash": "nash:NashConfig:train",
    # a full module path: the config class and the function live in one (torch-free until it runs) module
    "annotate": "tether.annotate.cli:AnnotateConfig:serve",
    "annotate export": "tether.annotate.cli:ExportConfig:export_labels",
    "annotate stats": "tether.annotate.cli:ExportConfig:show_stats",
}
USER_ERRORS = (DataError, RewardContractError, RewardSetupError, StoreError, FileNotFoundError)
"""Bad input found after the config loaded (a data row, a reward's output, a missing file): one line, exit 2.
`DataError` covers its subclasses (e.g. the code reward's `CodeTestsError`)."""
# subcommand → "module:function(argv) -> int"
TOOLS = {
    "generate": "tether.generate:generate_main",
    "eval": "tether.eval.cli:eval_main",
    "pipeline": "tether.pipeline:pipeline_main",
    "demo": "tether.demo:demo_main",
    "rollout-server": "tether.rollout.server:server_main",
    "sweep": "tether.sweep:sweep_main",
}

USAGE = """usage: tether <command> [--config FILE.yaml] [key=value ...]

Training recipes (each takes a YAML config and/or key=value overrides; --help lists every option):
  sft         supervised fine-tuning on demonstrations
  rm          Bradley-Terry reward model on preference pairs
  pm          pairwise preference model P(a ≻ b | x) on the same pairs (non-transitive preferences)
  dpo         DPO and its family (ipo, cdpo, robust, hinge, simpo, orpo, kto) on preferences
  grpo        GRPO / Dr. GRPO / DAPO / RLOO / REINFORCE with reward functions
  ppo         PPO with a critic and GAE
  nash        Nash-MD against a preference model (the policy no other policy beats)
  best-of-n   sample N per prompt, keep the best by reward
  rft         rejection-sampling fine-tuning (offline or iterative)
  distill     distil a teacher into a student
Tools:
  generate    sample completions from a model
  eval        pass@k, maj@k, reward-model accuracy, win rate, reward scores
  pipeline    run a multi-stage recipe (e.g. DeepSeek-R1, InstructGPT) from one YAML
  demo        the whole pipeline on the built-in tiny model, on this CPU
  annotate    a web page where people label preference pairs (then: annotate export | annotate stats)
  rollout-server  serve a rollout engine (vLLM or built-in) over HTTP for a trainer elsewhere
  sweep       one recipe over a list of values of one key (e.g. kl_coef), each run in its own folder, then a plot
"""


def _split(argv: list[str]) -> tuple[str | None, list[str], bool]:
    config_path, overrides, want_help = None, [], False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            want_help = True
        elif arg in ("-c", "--config"):
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file path")
            config_path = argv[i + 1]
            i += 1
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("--") and "=" in arg:  # --key=value, dashes read as underscores (--output-dir=X)
            key, value = arg[2:].split("=", 1)
            overrides.append(f"{key.replace('-', '_')}={value}")
        elif arg.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):  # --key value
            overrides.append(f"{arg[2:].replace('-', '_')}={argv[i + 1]}")
            i += 1
        elif "=" in arg:
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: options are given as key=value (see --help)")
        i += 1
    return config_path, overrides, want_help


def recipe_config(command: str):
    """The config class of a recipe command (torch-free)."""
    module_name, config_name, _ = RECIPES[command].split(":")
    module_name = module_name if module_name.startswith("tether.") else f"tether.config.{module_name}"
    return getattr(importlib.import_module(module_name), config_name)


def load_recipe(command: str):
    """(config class, train function) of a recipe command; imports the recipe (and torch)."""
    module_name, _, function_name = RECIPES[command].split(":")
    module_name = module_name if module_name.startswith("tether.") else f"tether.recipes.{module_name}"
    return recipe_config(command), getattr(importlib.import_module(module_name), function_name)


def run_recipe(command: str, argv: list[str]) -> int:
    config_cls = recipe_config(command)
    config_path, overrides, want_help = _split(argv)
    if want_help:
        doc = (config_cls.__doc__ or "").strip()
        print(f"usage: tether {command} [--config FILE.yaml] [key=value ...]\n\n{doc}\n\noptions:")
        print(config_help(config_cls))
        return 0
    config = load_config(config_cls, config_path, overrides)
    check_data_files(config)
    _, train = load_recipe(command)
    result = train(config)
    if result is not None:
        print(f"done: {result}")
    return 0


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if "torch" in sys.modules:  # no torch, no process group (e.g. a config error): nothing to leave
        from tether.runtime.distributed import exit_worker

        exit_worker(code)  # under torchrun: exits here (see its docstring); one process returns
    return code


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "annotate" and rest[:1] in (["export"], ["stats"]):
        command, rest = f"annotate {rest[0]}", rest[1:]
    try:
        if command in RECIPES:
            return run_recipe(command, rest)
        if command in TOOLS:
            module_name, function_name = TOOLS[command].split(":")
            return getattr(importlib.import_module(module_name), function_name)(rest) or 0
    except ConfigError as err:
        print(f"tether {command}: config error: {err}", file=sys.stderr)
        return 2
    except RewardSpecError as err:
        print(f"tether {command}: config error: config key 'rewards': {err}", file=sys.stderr)
        return 2
    except USER_ERRORS as err:
        print(f"tether {command}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except RewardFunctionError as err:  # the user's function raised: one line + their own frames
        print(f"tether {command}: {err}", file=sys.stderr)
        for frame in err.frames:
            print(f"  at {frame}", file=sys.stderr)
        return 2
    except RewardTimeoutError as err:
        print(f"tether {command}: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:  # under torchrun: another rank died or hung → say so instead of a gloo/nccl trace
        from tether.runtime.distributed import failure_message

        message = failure_message(err)
        if message is None:
            raise
        print(f"tether {command}: {message}", file=sys.stderr)
        return 1
    import difflib

    close = difflib.get_close_matches(command, list(RECIPES) + list(TOOLS), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    print(f"tether: unknown command {command!r}.{hint}\n\n{USAGE}", file=sys.stderr)
    return 2
