"""Reward registry, contract checks and weighted combination.

Every reward function has one contract, the same as TRL's:

    reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]

`columns` are the other dataset columns as lists aligned with `prompts` (e.g. `answer=[...]`).
`None` means "cannot judge": it is excluded from the group baseline and counted, never read as 0.

Built-ins are factories `make_xxx_reward(**options)` registered by name and imported only when
first asked for; a user's function is named `path/to/file.py:function` (or `package.module:function`).
`get_reward` wraps whichever function it finds in `checked_reward`, which enforces the contract.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import logging
import math
import numbers
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tether.rewards.user import load_user_reward
from tether.data.loading import DataError

log = logging.getLogger("tether")

RewardFn = Callable[..., list]
"""`reward(prompts, completions, **columns) -> list[float | None]`."""

ON_INVALID_MODES = ("raise", "none")
DEFAULT_TIME_LIMIT_S = 300.0
"""Wall-clock seconds one reward function may take on one batch (the `time_limit_s` of a `rewards:` entry)."""
HEARTBEAT_S = 30.0
"""While a reward call runs longer than this, a line says which reward the step is waiting on (every 30 s)."""
EXTRA_COLUMNS = ("completion_ids", "completion_lengths")
"""Columns the online recipes hand to every reward besides the data's own."""
_TETHER_DIR = str(Path(__file__).resolve().parents[1])

# Built-ins by name -> "module:factory", imported on first use so that naming `code` or `judge`
# never costs anything to someone who only uses `math`.
_REGISTRY: dict[str, str | Callable[..., RewardFn]] = {
    "math": "tether.rewards.math:make_math_reward",
    "format": "tether.rewards.format:make_format_reward",
    "length": "tether.rewards.length:make_length_reward",
    "language": "tether.rewards.language:make_language_reward",
    "code": "tether.rewards.code:make_code_reward",
    "reward_model": "tether.rewards.reward_model:make_reward_model_reward",
    "preference_model": "tether.rewards.preference_model:make_preference_model_reward",
    "judge": "tether.rewards.judge:make_judge_reward",
}


class RewardContractError(ValueError):
    """A reward function broke the contract: wrong length, NaN/inf, or a value that is not a number."""


class RewardFunctionError(RuntimeError):
    """A reward function raised; the message names the function and the row that raised.

    `frames` holds the raising code's own frames (outside tether), `"file:line in function: source"`."""

    def __init__(self, message: str, frames: Sequence[str] = ()):
        super().__init__(message)
        self.frames = list(frames)


class RewardTimeoutError(RuntimeError):
    """A reward function ran past its wall-clock limit (`time_limit_s`) on one batch."""


class RewardSpecError(ValueError):
    """A `rewards:` entry is wrong (no name, an unknown option, a bad weight or time limit): a config error."""


class RewardSetupError(ValueError):
    """A reward cannot run on this batch at all (e.g. a column it needs is missing).

    Raised by built-ins; `checked_reward` lets it through as is instead of searching for a row.
    """


def as_text(item: Any) -> str:
    """A prompt or completion as plain text: a string as is; a chat message (dict) its `content`;
    a list of messages the last message's content (TRL's conversational format)."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return str(item.get("content") or "")
    if isinstance(item, (list, tuple)):
        return as_text(item[-1]) if item else ""
    return "" if item is None else str(item)


# ---------------------------------------------------------------------------------------------
# Registry and lookup


def register_reward(name: str, factory: str | Callable[..., RewardFn] | None = None):
    """Register a reward factory under `name`: `register_reward("mine", make_mine)`, a
    `"module:factory"` string (imported on first use), or as a decorator `@register_reward("mine")`."""
    if factory is None:
        return lambda f: register_reward(name, f)
    _REGISTRY[name] = factory
    return factory


def available_rewards() -> list[str]:
    """Names of the registered built-in rewards."""
    return sorted(_REGISTRY)


def _resolve(target: str) -> Any:
    """Import `"module:attribute"` and return the attribute."""
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def _is_user_reference(name: str) -> bool:
    """`path/to/file.py:function` or `package.module:function` (a Windows drive letter is not one)."""
    left, sep, right = name.rpartition(":")
    return bool(sep and left and right and not (len(left) == 1 and left.isalpha()))


def get_reward(name: str | Callable, **options) -> RewardFn:
    """Return the reward function `name` with the contract checks applied.

    `name` is a built-in (`math`, `format`, `length`, `language`, `code`, `reward_model`, `judge`),
    `path/to/file.py:function`, `package.module:function`, or a callable. The options go to the
    built-in's factory; for a user function they are passed as keyword arguments on every call.
    The option `on_invalid` ("raise" or "none") applies to every reward: see `checked_reward`.
    """
    on_invalid = options.pop("on_invalid", "raise")
    if callable(name):
        function = _bind_options(name, options)
        label = getattr(name, "__name__", type(name).__name__)
        return _with_required_columns(checked_reward(function, name=label, on_invalid=on_invalid), name, options)
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string or a callable, got {name!r}")
    if name in _REGISTRY:
        factory = _REGISTRY[name]
        if isinstance(factory, str):
            try:
                factory = _resolve(factory)
            except (ImportError, AttributeError) as error:
                raise ImportError(f"reward '{name}' could not be loaded from {factory}: {error}") from error
        _check_options(f"reward '{name}'", factory, options)
        function = factory(**options)
        return checked_reward(function, name=getattr(function, "__name__", name), on_invalid=on_invalid)
    if _is_user_reference(name):
        function = load_user_reward(name)
        if options:
            _check_options(f"reward '{name}'", function, options, skip=2)
            label = function.__name__
            function = _bind_options(function, options)
        else:
            label = function.__name__
        original = function.__wrapped__ if options else function
        return _with_required_columns(checked_reward(function, name=label, on_invalid=on_invalid), original, options)
    raise RewardSpecError(_unknown_name_message(name))


def _with_required_columns(reward: RewardFn, function: Callable, options: dict) -> RewardFn:
    """Record on `reward` the columns a user's `function` needs: its parameters after (prompts, completions)
    with no default and not given as options. `RewardSet.check_rows` checks the data has them at load time."""
    try:
        parameters = list(inspect.signature(function).parameters.values())[2:]
    except (TypeError, ValueError):
        return reward
    reward.required_columns = [
        p.name for p in parameters
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty and p.name not in options
    ]
    return reward


def _bind_options(function: Callable, options: dict) -> Callable:
    """`function` called with `options` as keyword arguments, keeping its attributes (`stats`, `close`,
    `check_rows`) for `checked_reward` to find."""
    return functools.update_wrapper(functools.partial(function, **options), function) if options else function


def _unknown_name_message(name: str) -> str:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return (
        f"unknown reward '{name}'.{hint} Built-in rewards: {', '.join(available_rewards())}. "
        f"For your own function use 'path/to/file.py:function'."
    )


def _check_options(what: str, function: Callable, options: dict, skip: int = 0) -> None:
    """Raise if `options` holds a keyword that `function` does not take (unless it takes **kwargs)."""
    try:
        parameters = list(inspect.signature(function).parameters.values())[skip:]
    except (TypeError, ValueError):  # builtins without a signature: let the call itself complain
        return
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    valid = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for option in options:
        if option not in valid:
            close = difflib.get_close_matches(option, valid, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            listed = ", ".join(valid + ["on_invalid"]) if valid else "on_invalid"
            raise RewardSpecError(f"{what} has no option '{option}'.{hint} Valid options: {listed}.")


# ---------------------------------------------------------------------------------------------
# Contract checks


def _as_float(value: Any) -> tuple[float | None, str | None]:
    """(float, None) for a valid reward value, (None, reason) otherwise. `None` passes as None.

    Accepted: int, float, bool (True -> 1.0, a common `[a == b for ...]` idiom), numpy scalars and
    0-d tensors. Rejected: NaN, +-inf, strings and everything else.
    """
    if value is None:
        return None, None
    if isinstance(value, numbers.Real):  # includes bool and numpy scalars
        number = float(value)
    elif getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # 0-d tensor / array
        item = value.item()
        if not isinstance(item, numbers.Real):
            return None, f"{type(value).__name__} holding {type(item).__name__} is not a number"
        number = float(item)
    else:
        return None, f"{type(value).__name__} is not a number"
    if not math.isfinite(number):
        return None, "not finite"
    return number, None


def _row(columns: dict, index: int) -> dict:
    """The columns of one row, each still a one-element list."""
    return {
        key: [value[index]] if isinstance(value, (list, tuple)) else value
        for key, value in columns.items()
    }


def checked_reward(function: Callable, name: str, on_invalid: str = "raise") -> RewardFn:
    """Wrap `function` so every call obeys the contract.

    - Inputs: `prompts`, `completions` and every list column must have the same length.
    - A raising function: the call is repeated row by row to find the row, and a
      `RewardFunctionError` names the function, the row and the exception text
      (a `RewardSetupError`, which concerns the whole batch, and a `DataError`, which names its own row,
      pass through as they are).
    - Output: a list with one value per completion (else `RewardContractError`, always).
      Each value must be a finite number, a bool (read as 1.0/0.0) or None. An invalid value
      (NaN, inf, a string, ...) raises `RewardContractError` naming the function and the index;
      with `on_invalid="none"` it becomes None instead and is counted in `stats["invalid"]`.

    The wrapper carries `__name__ = name`, a `stats` dict of counters (the wrapped function's own
    `stats`, e.g. the math reward's timeouts, plus `invalid`) and `close()` (the function's, if any).
    """
    if on_invalid not in ON_INVALID_MODES:
        raise RewardSpecError(f"reward '{name}': on_invalid must be one of {ON_INVALID_MODES}, got {on_invalid!r}")
    if getattr(function, "_tether_checked", False):
        return function

    def reward(prompts: Sequence, completions: Sequence, **columns) -> list[float | None]:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"reward '{name}': got {len(prompts)} prompts but {n} completions")
        for key, value in columns.items():
            if isinstance(value, (list, tuple)) and len(value) != n:
                raise ValueError(f"reward '{name}': column '{key}' has {len(value)} values for {n} completions")
        try:
            values = function(prompts, completions, **columns)
        except (RewardSetupError, DataError):
            raise  # about the whole batch or already names its row: re-running row by row adds nothing
        except Exception as error:
            raise _locate_failure(function, name, prompts, completions, columns, error) from error

        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise RewardContractError(
                f"reward '{name}' returned {type(values).__name__}; expected a list of {n} values "
                f"(float, or None when a completion cannot be judged)"
            )
        values = list(values)
        if len(values) != n:
            index = min(len(values), n)
            raise RewardContractError(
                f"reward '{name}' returned {len(values)} values for {n} completions "
                f"(first unmatched index: {index}); return exactly one value per completion"
            )
        checked: list[float | None] = []
        for index, value in enumerate(values):
            number, problem = _as_float(value)
            if problem is not None:
                if on_invalid == "none":
                    reward.stats["invalid"] += 1
                    checked.append(None)
                    continue
                raise RewardContractError(
                    f"reward '{name}' returned an invalid value at index {index}: {value!r} ({problem}). "
                    f"Return a finite float, or None when the completion cannot be judged; "
                    f"or set on_invalid: none to count such values as None."
                )
            checked.append(number)
        return checked

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = getattr(function, "__doc__", None)
    reward.__wrapped__ = function
    reward._tether_checked = True
    stats = getattr(function, "stats", None)
    reward.stats = stats if isinstance(stats, dict) else {}
    reward.stats.setdefault("invalid", 0)
    reward.close = getattr(function, "close", lambda: None)  # e.g. stops the math worker process
    check_rows = getattr(function, "check_rows", None)  # e.g. the code reward's tests, checked at load time
    if check_rows is not None:
        reward.check_rows = check_rows
    return reward


def _locate_failure(function, name, prompts, completions, columns, batch_error) -> RewardFunctionError:
    """Call `function` row by row to find the row that raises; build the error that names it."""
    for index in range(len(completions)):
        try:
            function(prompts[index : index + 1], completions[index : index + 1], **_row(columns, index))
        except Exception as error:
            return RewardFunctionError(
                f"reward '{name}' raised on row {index}: {type(error).__name__}: {error}", _own_frames(error)
            )
    return RewardFunctionError(
        f"reward '{name}' raised on the batch of {len(completions)} (no single row raises alone): "
        f"{type(batch_error).__name__}: {batch_error}", _own_frames(batch_error)
    )


def _own_frames(error: BaseException, limit: int = 8) -> list[str]:
    """The frames of `error`'s traceback in the user's code (not in tether), innermost last."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if not frame.filename.startswith(_TETHER_DIR)]
    return [f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
            for frame in frames[-limit:]]


class _TimedCaller:
    """Runs calls on one long-lived daemon thread and waits for each at most `limit_s` seconds.

    A call still running at its limit is abandoned (the thread stays blocked in it; as a daemon it does not keep
    the process alive) and `RewardTimeoutError` is raised; the next call starts a fresh thread. One thread for
    the set's lifetime, not one per call, so processes the functions start (math worker, sandboxes) have a
    stable parent thread."""

    def __init__(self, name: str):
        self.name = name
        self._thread: threading.Thread | None = None
        self._jobs: queue.SimpleQueue | None = None

    def _start(self) -> None:
        jobs = self._jobs = queue.SimpleQueue()

        def serve():
            while True:
                call, done = jobs.get()
                try:
                    done.value = call()
                except BaseException as error:  # noqa: BLE001 - handed to the waiting thread as is
                    done.error = error
                done.set()

        self._thread = threading.Thread(target=serve, name=f"tether-reward-{self.name}", daemon=True)
        self._thread.start()

    def __call__(self, call: Callable, limit_s: float, where: str):
        if self._thread is None or not self._thread.is_alive():
            self._start()
        done = threading.Event()
        done.value, done.error = None, None
        self._jobs.put((call, done))
        start = time.monotonic()
        heartbeat = min(HEARTBEAT_S, limit_s / 4)
        while not done.wait(min(heartbeat, max(0.0, start + limit_s - time.monotonic()))):
            elapsed = time.monotonic() - start
            if elapsed >= limit_s:
                self._thread = self._jobs = None  # abandoned: blocked in the call for good
                raise RewardTimeoutError(
                    f"reward '{self.name}' did not return within its time limit of {limit_s:g} s{where}; the run "
                    f"stops here (the last checkpoint is kept). Make the function faster, or raise the limit "
                    f"with time_limit_s in its rewards entry")
            log.info("scoring%s: waiting on reward '%s' for %.0f s (limit %g s)", where, self.name, elapsed, limit_s)
        if done.error is not None:
            raise done.error
        return done.value


# ---------------------------------------------------------------------------------------------
# Weighted combination


@dataclass
class RewardResult:
    """Rewards for one batch: the weighted total and each function's values (aligned with completions)."""

    total: list[float | None]
    """sum_k weight_k * reward_k per completion; None if any weighted (weight != 0) component is None."""
    per_function: dict[str, list[float | None]]
    """name -> that function's values."""
    weights: dict[str, float]
    none_count: dict[str, int]
    """name -> how many of its values were None in this batch."""
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    """name -> the function's running counters (e.g. math timeouts, invalid values), cumulative."""

    @staticmethod
    def concat(parts: list[RewardResult]) -> RewardResult:
        """One result from the results of consecutive batches (e.g. each rank's share): the values in order,
        the None counts and the counters summed."""
        first = parts[0]
        return RewardResult(
            total=[value for part in parts for value in part.total],
            per_function={name: [value for part in parts for value in part.per_function[name]]
                          for name in first.per_function},
            weights=dict(first.weights),
            none_count={name: sum(part.none_count[name] for part in parts) for name in first.none_count},
            stats={name: {counter: sum(part.stats.get(name, {}).get(counter, 0) for part in parts)
                          for counter in counters} for name, counters in first.stats.items()},
        )

    def metrics(self, prefix: str = "rewards/") -> dict[str, float]:
        """Flat summary for logging: mean/std per function and of the total (ignoring None), None counts.

        Keys: `{prefix}{name}/mean`, `/std`, `/none_count`, `{prefix}total/...`, and each counter as
        `{prefix}{name}/{counter}`. Mean/std of an all-None column are NaN.
        """
        out: dict[str, float] = {}
        for name, values in [*self.per_function.items(), ("total", self.total)]:
            mean, std = _mean_std(values)
            out[f"{prefix}{name}/mean"] = mean
            out[f"{prefix}{name}/std"] = std
            out[f"{prefix}{name}/none_count"] = float(sum(v is None for v in values))
        for name, counters in self.stats.items():
            for counter, count in counters.items():
                out[f"{prefix}{name}/{counter}"] = float(count)
        return out


def _mean_std(values: list[float | None]) -> tuple[float, float]:
    """Population mean and std over the non-None values (NaN when there are none)."""
    present = [v for v in values if v is not None]
    if not present:
        return math.nan, math.nan
    mean = sum(present) / len(present)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in present) / len(present))


class RewardSet:
    """Several reward functions combined with weights.

    Built from a config list, as in a recipe's `rewards:` key:

        RewardSet([{"name": "math", "weight": 1.0, "timeout": 5}, {"name": "format", "weight": 0.2}])

    Each entry is a dict (`name`, optional `weight` = 1.0, optional `time_limit_s` = 300, any other keys are
    options for that reward), a bare name string, or a callable. Functions with the same name get `_2`, `_3`,
    ... suffixes. A weight of 0 logs a reward without letting it into the total.

    Every call of every function is bounded by its `time_limit_s` (wall-clock seconds per batch): past it,
    `RewardTimeoutError` names the function, the limit and `step` (which the training loop sets). While a
    call runs longer than 30 s, a log line every 30 s says which reward the step is waiting on.
    """

    step: int | None = None
    """The training step being scored (set by the loop; named in a time-limit error), None outside training."""

    def __init__(self, specs: Sequence[dict | str | Callable]):
        if isinstance(specs, (str, dict)) or callable(specs):
            specs = [specs]
        if not specs:
            raise RewardSpecError("RewardSet needs at least one reward, e.g. [{'name': 'math', 'weight': 1.0}]")
        self.functions: dict[str, RewardFn] = {}
        self.weights: dict[str, float] = {}
        self.time_limits: dict[str, float] = {}
        self._callers: dict[str, _TimedCaller] = {}
        for position, spec in enumerate(specs):
            if isinstance(spec, dict):
                options = dict(spec)
                if "name" not in options:
                    raise RewardSpecError(f"rewards[{position}] has no 'name' (got keys {sorted(options)})")
                reward_name = options.pop("name")
                weight = options.pop("weight", 1.0)
                time_limit = options.pop("time_limit_s", DEFAULT_TIME_LIMIT_S)
            else:
                reward_name, weight, time_limit, options = spec, 1.0, DEFAULT_TIME_LIMIT_S, {}
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
                raise RewardSpecError(
                    f"rewards[{position}] ({reward_name}): weight must be a finite number, got {weight!r}"
                )
            if (isinstance(time_limit, bool) or not isinstance(time_limit, numbers.Real)
                    or not math.isfinite(time_limit) or time_limit <= 0):
                raise RewardSpecError(f"rewards[{position}] ({reward_name}): time_limit_s must be a positive number of "
                                 f"seconds, got {time_limit!r}")
            function = get_reward(reward_name, **options)
            label = function.__name__
            suffix = 2
            while label in self.functions:
                label = f"{function.__name__}_{suffix}"
                suffix += 1
            self.functions[label] = function
            self.weights[label] = float(weight)
            self.time_limits[label] = float(time_limit)
            self._callers[label] = _TimedCaller(label)

    @property
    def names(self) -> list[str]:
        return list(self.functions)

    def __call__(self, prompts: Sequence, completions: Sequence, **columns) -> RewardResult:
        where = f" at step {self.step}" if self.step is not None else ""
        per_function = {
            name: self._callers[name](functools.partial(fn, prompts, completions, **columns),
                                      self.time_limits[name], where)
            for name, fn in self.functions.items()
        }
        total: list[float | None] = []
        for index in range(len(completions)):
            value: float | None = 0.0
            for name, values in per_function.items():
                weight = self.weights[name]
                if weight == 0.0:
                    continue
                if values[index] is None:
                    value = None
                    break
                value += weight * values[index]
            total.append(value)
        return RewardResult(
            total=total,
            per_function=per_function,
            weights=dict(self.weights),
            none_count={name: sum(v is None for v in values) for name, values in per_function.items()},
            stats={name: dict(fn.stats) for name, fn in self.functions.items() if getattr(fn, "stats", None)},
        )

    def check_rows(self, source: str, rows: Sequence[tuple[int, dict]]) -> None:
        """Validate the data's rows for the functions that can (a function with a `check_rows(source, rows)`
        attribute, as the code reward checks each row's `tests`), when the data is loaded: a bad row fails
        before any sampling, with the file, row and field named. rows: (row index in the file, columns).
        A user's function whose parameters name a column the data lacks (`def f(prompts, completions, solution)`)
        is refused here too, listing the data's columns."""
        for name, function in self.functions.items():
            for column in getattr(function, "required_columns", ()):
                lacking = next((index for index, columns in rows
                                if column not in columns and column not in EXTRA_COLUMNS), None)
                if lacking is not None:
                    present = sorted({key for _, columns in rows for key in columns} | set(EXTRA_COLUMNS))
                    raise DataError(source, f"reward '{name}' needs the column '{column}', which this row lacks. "
                                            f"Columns in the data: {', '.join(present)}. Add the column, or give "
                                            f"the parameter a default", lacking, column)
            check = getattr(function, "check_rows", None)
            if check is not None:
                check(source, rows)

    def state_dict(self) -> list[dict[str, dict[str, int]]]:
        """Each function's cumulative counters (e.g. math `no_answer`) on every rank, in rank order, for the
        trainer state: a resumed run goes on counting where the checkpoint was. Every rank must call it."""
        from tether.runtime import distributed

        return distributed.all_gather_object({name: dict(fn.stats) for name, fn in self.functions.items()})

    def load_state_dict(self, state: list[dict[str, dict[str, int]]] | None) -> None:
        """Restore this rank's counters from `state_dict()` (in place: the functions keep counting into the same
        dicts). A checkpoint without them (an older one) leaves the counters as they are."""
        from tether.runtime import distributed

        if state and distributed.rank() < len(state):
            for name, counters in state[distributed.rank()].items():
                if name in self.functions:
                    self.functions[name].stats.update(counters)

    def close(self) -> None:
        """Release what the functions hold (worker processes, models); calling them again restarts it."""
        for function in self.functions.values():
            function.close()

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}×{weight:g}" for name, weight in self.weights.items())
        return f"RewardSet({parts})"


CombinedReward = RewardSet
