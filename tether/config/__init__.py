"""Typed, strict configuration: one dataclass per recipe, a YAML file plus dotted `key=value` overrides.

Every field carries a docstring (the string literal under it); `--help` prints them. An unknown key,
a bad type or a bad value stops the run before any work, naming the key and what is expected.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import math

import yaml

from tether.rewards import available_rewards, get_reward


class ConfigError(ValueError):
    """A configuration problem, with the key it concerns in the message."""


@dataclass
class LoraConfig:
    """LoRA adapter options (Hu et al. 2021); `r = 0` means no LoRA, full fine-tuning."""

    r: int = 0
    """Rank of the low-rank update; 0 disables LoRA."""
    alpha: float = 16.0
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names that receive adapters (e.g. q_proj, v_proj; "all-linear" for every linear layer)."""


@dataclass
class DistributedConfig:
    """Multi-process training under torchrun (ignored in a single process)."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every rank holds the whole model, gradients are averaged; fsdp: parameters, gradients and
    optimizer state are sharded over ranks (FSDP2), for models that do not fit on one device."""
    timeout_s: float = 600.0
    """Seconds a collective waits for the other ranks before the job stops with an error (a rank died or hung)."""

    def validate(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError(f"config key 'distributed.timeout_s': expected a positive number, got {self.timeout_s}")


@dataclass
class TrainConfig:
    """Keys every recipe shares."""

    model: str = "tiny"
    """Model to start from: `tiny` (built-in), a local Hugging Face folder, or a hub name."""
    data: str = ""
    """Training data: a .jsonl/.json/.parquet/.csv file, a saved `datasets` folder, or a hub dataset name."""
    eval_data: str = ""
    """Optional held-out data in the same format as `data`."""
    data_split: str = "train"
    """Split to read when `data` is a `datasets` name or folder with splits."""
    output_dir: str = "runs/run"
    """Run folder: config.yaml, metrics.jsonl, checkpoints/, final/."""
    max_steps: int = -1
    """Optimizer steps to run; -1 means `epochs` full passes over the data."""
    epochs: float = 1.0
    """Passes over the training data when `max_steps` is -1."""
    batch_size: int = 8
    """Examples per optimizer step (across gradient accumulation and all ranks)."""
    micro_batch_size: int = 0
    """Examples per forward/backward; 0 means batch_size (no accumulation). Must divide batch_size."""
    learning_rate: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to learning_rate."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    padding_free: bool = True
    """Run a batch's rows end to end as one sequence, attention kept within each row, so no work is spent on
    padding and a prompt shared by several rows runs once (Llama, Mistral, Qwen2/3 models with sdpa or eager
    attention, without gradient checkpointing; other models run padded). Same results up to float rounding."""
    max_length: int = 512
    """Longest tokenized example (prompt + completion)."""
    overlong: Literal["error", "truncate", "drop"] = "error"
    """What to do with examples longer than max_length; truncated/dropped rows are counted in the log."""
    seed: int = 0
    """Seed for model init (tiny), data order and sampling."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype: auto = float32 on CPU, bfloat16 on CUDA."""
    device: str = "auto"
    """auto, cpu or cuda[:N]."""
    log_steps: int = 1
    """Write a metrics line every N steps."""
    save_steps: int = 0
    """Write a checkpoint every N steps; 0 only at the end."""
    keep_last: int = 2
    """Checkpoints to keep (older ones are deleted after a newer one is complete)."""
    resume: bool = False
    """Continue from the latest complete checkpoint in output_dir/checkpoints. Without it, a run refuses an
    output_dir whose checkpoints/ holds an earlier run's checkpoint (use a new output_dir to start over)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapter options (lora.r > 0 enables it)."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Loggers besides metrics.jsonl: tensorboard, wandb (when installed)."""
    progress: bool = True
    """Show a progress bar with ETA."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Multi-GPU / multi-node options (strategy, timeout_s), used when launched with torchrun."""


# ----------------------------------------------------------------------------- field docs

def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings of a dataclass and its bases: {field name: text}."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant):
                    docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list[{_describe(inner)}]"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


# ----------------------------------------------------------------------------- coercion

def _coerce(value: Any, tp, key: str):
    """Check/convert `value` to type `tp`, raising ConfigError naming `key` on mismatch."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': expected {_describe(tp)}, got {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, prefix=key + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key '{key}': expected one of {_describe(tp)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise bad
        return value
    return value


def _unknown_key(cls, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5) or [
        n for n in names if key.startswith(n) or n.startswith(key)][:1]
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{prefix}{key}'.{hint} Run with --help to list the valid keys.")


def _build(cls, values: dict, prefix: str = ""):
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(cls, key, prefix)
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            # A partial section overrides the field's own default (its default_factory), key by key.
            default = next(f for f in dataclasses.fields(cls) if f.name == key)
            if default.default_factory is not dataclasses.MISSING:
                base = {f.name: getattr(default.default_factory(), f.name) for f in dataclasses.fields(hints[key])}
                value = {**base, **value}
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        validate()
    return instance


DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
DATA_KEYS = ("data", "eval_data")


def check_data_files(config) -> None:
    """`data` and `eval_data` naming a local file (by its suffix) must name one that exists; anything else (a
    `datasets` folder or hub name) is checked by the loader. Run by the CLI on a loaded config (a pipeline's
    stage may read a file that an earlier stage writes)."""
    for key in DATA_KEYS:
        value = getattr(config, key, "")
        if isinstance(value, str) and value.endswith(DATA_FILE_SUFFIXES) and not Path(value).is_file():
            raise ConfigError(f"config key '{key}': file {value} does not exist (expected a "
                              f"{'/'.join(DATA_FILE_SUFFIXES)} file, a datasets folder or a hub dataset name)")


def check_rewards(specs: list, key: str = "rewards") -> None:
    """Each reward spec names a built-in or `path/to/file.py:function` and has a finite numeric weight.
    Built-ins' own options are checked when they are built; a user's file is imported now."""
    for index, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ConfigError(f"config key '{key}[{index}]': expected a mapping such as {{name: math, weight: 1.0}}, "
                              f"got {spec!r}")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"config key '{key}[{index}]': each reward needs a name, e.g. "
                              f"{{name: math, weight: 1.0}}; got {spec!r}")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"config key '{key}[{index}].weight': expected a finite number, got {weight!r}")
        if name not in available_rewards():  # built-ins are built (and their options checked) at train start
            try:  # an unknown name raises the registry's message; a user's file:function is imported
                get_reward(name)
            except ValueError as err:
                raise ConfigError(f"config key '{key}[{index}]': {err}") from None


# ----------------------------------------------------------------------------- public API

def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` → ("a.b", parsed value); the value is read as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. learning_rate=1e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-4 as a string; accept plain float syntax too.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key.strip(), value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def load_config(cls, path: str | Path | None = None, overrides: list[str] | dict | None = None):
    """Build a `cls` instance from an optional YAML file and `key=value` overrides; strict."""
    values: dict = {}
    if path:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping of keys, got {type(loaded).__name__}")
        values = loaded
    if isinstance(overrides, dict):
        overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in overrides.items()]
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(values, key, value)
    return _build(cls, values)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def config_help(cls) -> str:
    """Every option with its type, default and meaning (for `tether <cmd> --help`)."""
    lines = []
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(tp):
            sub_docs = field_docs(tp)
            sub_hints = _hints(tp)
            for sf in dataclasses.fields(tp):
                sub_default = getattr(default, sf.name)
                lines.append(_help_line(f"{f.name}.{sf.name}", sub_hints[sf.name], sub_default, sub_docs.get(sf.name, "")))
        else:
            lines.append(_help_line(f.name, tp, default, docs.get(f.name, "")))
    return "\n".join(lines)


def _help_line(name: str, tp, default, doc: str) -> str:
    head = f"  {name} ({_describe(tp)}, default {default!r})"
    return head + "\n      " + "\n      ".join(textwrap.wrap(doc, 88)) if doc else head
