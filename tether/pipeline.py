"""Multi-stage runs from one YAML: `tether pipeline recipe.yaml [output_dir=DIR] [STAGE.KEY=VALUE ...] [--dry-run]`.

    output_dir: runs/r1_tiny
    defaults: {seed: 0, report_to: []}      # given to every stage whose recipe has the key
    stages:
      - name: cold_start
        recipe: sft
        model: tiny
        data: examples/data/math_cold_start.jsonl
      - name: reasoning_rl
        recipe: grpo
        model: "@cold_start"                # the model cold_start wrote
        data: examples/data/math_train.jsonl

Each stage is `name`, `recipe` (sft, rm, dpo, grpo, ppo, rft, distill, best-of-n, eval) and that recipe's
config keys. It runs in `output_dir/<name>/` (the pipeline sets the stage's output_dir).

References: a string value `"@name"` is the main output of the earlier stage `name` (its model folder, or
for best-of-n its best.jsonl); `"@name.model"`, `"@name.data"`, `"@name.metrics"` pick one output (see
STAGE_OUTPUTS). They may appear anywhere in a stage's keys, e.g. inside `rewards`. `"@@text"` is the
literal string "@text".

Every stage's config is built and validated before the first stage runs, so a typo in the last stage
stops the pipeline before any work. When a stage completes, `output_dir/<name>/DONE` records its
resolved config and outputs. Re-running the pipeline skips stages with a DONE marker (if the recipe for a
finished stage changed, it stops and says so: delete that stage's folder to re-run it) and restarts an
interrupted stage with `resume: true`, so it continues from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tether.config import ConfigError, load_config, parse_override

log = logging.getLogger("tether")

# What each recipe leaves in its folder, by output name; the first is what "@stage" means.
STAGE_OUTPUTS = {
    "sft": {"model": "final"},
    "rm": {"model": "final"},
    "dpo": {"model": "final"},
    "grpo": {"model": "final"},
    "ppo": {"model": "final"},
    "rft": {"model": "final", "data": "kept.jsonl"},
    "distill": {"model": "final", "data": "traces.jsonl"},
    "best-of-n": {"data": "best.jsonl", "all": "all.jsonl"},
    "eval": {"metrics": "eval.json"},
}
STAGE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
REFERENCE = re.compile(r"^@([A-Za-z0-9_-]+)(?:\.([a-z]+))?$")
DONE = "DONE"


@dataclass
class Stage:
    name: str
    recipe: str
    values: dict
    """The stage's config keys as written (references unresolved, output_dir not yet set)."""


def stage_recipe(recipe: str):
    """(ConfigClass, function) of a stage recipe; `function(config)` runs it."""
    if recipe == "eval":
        from tether.eval.generation import EvalConfig, run_eval

        return EvalConfig, run_eval
    from tether.cli import load_recipe

    try:
        return load_recipe(recipe)
    except ImportError as err:
        raise ConfigError(f"recipe '{recipe}' is not available: {err}") from None


# ----------------------------------------------------------------------------- reading the recipe

def read_pipeline(path: str | Path, overrides: list[str] = ()) -> tuple[Path, list[Stage]]:
    """(output_dir, stages) from a pipeline YAML and `output_dir=...` / `stage.key=value` overrides."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"pipeline file {path} does not exist") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), list) or not spec["stages"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty 'stages:' list")
    unknown = set(spec) - {"output_dir", "defaults", "stages"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; valid: output_dir, defaults, stages")
    output_dir = spec.get("output_dir") or f"runs/{Path(path).stem}"
    defaults = spec.get("defaults") or {}

    stages: list[Stage] = []
    for index, entry in enumerate(spec["stages"]):
        where = f"{path}: stages[{index}]"
        if not isinstance(entry, dict) or "name" not in entry or "recipe" not in entry:
            raise ConfigError(f"{where}: each stage needs 'name' and 'recipe' (plus that recipe's keys)")
        values = dict(entry)
        name, recipe = str(values.pop("name")), values.pop("recipe")
        if not STAGE_NAME.match(name) or name in {s.name for s in stages}:
            raise ConfigError(f"{where}: stage name {name!r} must be unique and made of letters, digits, _ and -")
        if recipe not in STAGE_OUTPUTS:
            raise ConfigError(f"{where}: unknown recipe {recipe!r}; valid: {', '.join(STAGE_OUTPUTS)}")
        if "output_dir" in values:
            raise ConfigError(f"{where}: do not set output_dir in a stage; it runs in <output_dir>/{name}/")
        stages.append(Stage(name, recipe, values))

    for text in overrides:
        key, value = parse_override(text)
        if key == "output_dir":
            output_dir = value
            continue
        stage_name, _, stage_key = key.partition(".")
        target = next((s for s in stages if s.name == stage_name), None)
        if target is None or not stage_key:
            raise ConfigError(f"override {text!r}: expected output_dir=... or <stage>.<key>=value with a stage "
                              f"of {[s.name for s in stages]}")
        node = target.values
        *parents, last = stage_key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    apply_defaults(defaults, stages)
    return Path(output_dir), stages


def apply_defaults(defaults: dict, stages: list[Stage]) -> None:
    """Give each `defaults` key to every stage whose recipe has it (and that does not set it itself)."""
    used = set()
    for stage in stages:
        names = {f.name for f in dataclasses.fields(stage_recipe(stage.recipe)[0])}
        for key, value in defaults.items():
            if key in names:
                used.add(key)
                stage.values.setdefault(key, copy.deepcopy(value))
    unused = set(defaults) - used
    if unused:
        raise ConfigError(f"defaults: key(s) {sorted(unused)} belong to none of the stages' recipes")


# ----------------------------------------------------------------------------- references

def stage_outputs(stage: Stage, stage_dir: Path) -> dict[str, str]:
    return {kind: str(stage_dir / relative) for kind, relative in STAGE_OUTPUTS[stage.recipe].items()}


def resolve(value, outputs: dict[str, dict[str, str]], where: str):
    """`value` with every "@stage[.output]" string replaced by that earlier stage's output path."""
    if isinstance(value, dict):
        return {k: resolve(v, outputs, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, outputs, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or not value.startswith("@"):
        return value
    if value.startswith("@@"):
        return value[1:]
    match = REFERENCE.match(value)
    if not match or match.group(1) not in outputs:
        raise ConfigError(f"{where}: {value!r} does not name an earlier stage; earlier stages: "
                          f"{list(outputs) or 'none'} (write '@@...' for a literal '@')")
    stage, kind = match.group(1), match.group(2)
    available = outputs[stage]
    if kind is None:
        kind = next(iter(available))
    if kind not in available:
        raise ConfigError(f"{where}: stage '{stage}' has no output '{kind}'; it has {list(available)}")
    return available[kind]


def plan(output_dir: Path, stages: list[Stage]) -> list[tuple[Stage, dict]]:
    """Resolve and validate every stage's config before anything runs: [(stage, resolved values)]."""
    outputs: dict[str, dict[str, str]] = {}
    planned = []
    for stage in stages:
        stage_dir = output_dir / stage.name
        values = resolve(stage.values, outputs, f"stage '{stage.name}'")
        values["output_dir"] = str(stage_dir)
        config_cls, _ = stage_recipe(stage.recipe)
        try:
            load_config(config_cls, None, values)
        except ConfigError as err:
            raise ConfigError(f"stage '{stage.name}' ({stage.recipe}): {err}") from None
        outputs[stage.name] = stage_outputs(stage, stage_dir)
        planned.append((stage, values))
    return planned


# ----------------------------------------------------------------------------- running

def run_pipeline(output_dir: Path, stages: list[Stage], *, dry_run: bool = False) -> dict[str, dict[str, str]]:
    """Run the stages in order, skipping finished ones and resuming an interrupted one; returns every
    stage's outputs {stage: {output: path}}."""
    planned = plan(output_dir, stages)
    outputs: dict[str, dict[str, str]] = {}
    for number, (stage, values) in enumerate(planned, 1):
        stage_dir = output_dir / stage.name
        label = f"stage {number}/{len(planned)} '{stage.name}' ({stage.recipe})"
        recorded = json.loads((stage_dir / DONE).read_text()) if (stage_dir / DONE).exists() else None
        if recorded is not None:
            if recorded["config"] != json.loads(json.dumps(values)):
                raise ConfigError(f"{label} finished earlier with a different config (see {stage_dir / DONE}); "
                                  f"delete {stage_dir} (and the stages after it) to re-run it with the new one")
            outputs[stage.name] = recorded["outputs"]
            log.info("%s: done earlier, skipped", label)
            continue
        config_cls, function = stage_recipe(stage.recipe)
        resuming = stage_dir.is_dir() and any(stage_dir.iterdir())
        has_resume = "resume" in {f.name for f in dataclasses.fields(config_cls)}
        if dry_run:
            state = "resume" if resuming else "run"
            print(f"{label}: would {state}\n" + yaml.safe_dump(values, sort_keys=False, indent=2))
            outputs[stage.name] = stage_outputs(stage, stage_dir)
            continue
        config = load_config(config_cls, None, {**values, "resume": True} if resuming and has_resume else values)
        log.info("%s: %s in %s", label, "resuming" if resuming else "starting", stage_dir)
        started = time.perf_counter()
        function(config)
        outputs[stage.name] = {kind: path for kind, path in stage_outputs(stage, stage_dir).items()
                               if Path(path).exists()}
        if not outputs[stage.name]:
            raise RuntimeError(f"{label} finished but wrote none of its outputs {STAGE_OUTPUTS[stage.recipe]}")
        seconds = time.perf_counter() - started
        (stage_dir / DONE).write_text(json.dumps({"recipe": stage.recipe, "config": values,
                                                  "outputs": outputs[stage.name], "seconds": seconds}, indent=2))
        log.info("%s: done in %.1fs → %s", label, seconds, outputs[stage.name])
    if not dry_run:
        (output_dir / "pipeline.json").write_text(json.dumps({"stages": outputs}, indent=2) + "\n")
    return outputs


def pipeline_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tether pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="pipeline YAML (see examples/pipeline_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="output_dir=DIR or STAGE.KEY=VALUE")
    parser.add_argument("--dry-run", action="store_true", help="validate and print each stage's config; run nothing")
    args = parser.parse_args(argv)
    output_dir, stages = read_pipeline(args.recipe, args.overrides)
    outputs = run_pipeline(output_dir, stages, dry_run=args.dry_run)
    if not args.dry_run:
        print(f"pipeline done: {output_dir}")
        for name, paths in outputs.items():
            print(f"  {name}: " + ", ".join(f"{kind} {path}" for kind, path in paths.items()))
    return 0
