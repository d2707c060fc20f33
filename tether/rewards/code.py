"""The `code` reward: run the model's program against the row's tests in the sandbox; judge here.

A row's `tests` (checked by `validate_tests` when the data is loaded, and again by the reward):

- stdin/stdout cases: `[{"input": "1 2\\n", "output": "3\\n"}, ...]` (or APPS-style
  `{"inputs": [...], "outputs": [...]}`). The program runs once per case with `input` on stdin;
  its stdout is compared HERE with `output`, exactly or ignoring whitespace (`compare`).
- assert-style: a string of test code (one test), or a list of strings / `{"code": ...}` (one test
  each), e.g. `"assert add(2, 2) == 4"`. The test code runs in a harness process in which each
  function the program defines is a stand-in that calls the program in ANOTHER process and gets
  back plain data (numbers, strings, lists, tuples, dicts, sets, bytes). The test passes only if
  the harness prints a random marker, made for this run and never visible to the program, after
  the last assert, and exits 0. A NaN coming back from the program fails the test (every comparison
  with NaN is False, so `assert not f(x) > 3` would hold) unless the test code itself expects one
  (`expects_nan`: it mentions `nan` / `isnan`). (HumanEval rows: `def check(candidate)` plus an `entry_point`
  column get `check(<entry_point>)` appended.)
- a time limit per test: `"timeout"` in a case, else the row's `time_limit` column, else the
  reward's `timeout` option (capped at `max_time_limit`).
- JSON text holding any of these is parsed first.

Reward per completion: the fraction of its tests passed (`mode="fraction"`) or 1.0 only when all
pass (`mode="all"`). Timeouts, crashes, memory and output-limit kills are failures. None only when
the sandbox itself failed (never something the program can cause). Outcomes are counted in
`reward.stats` (running totals) and `reward.last_stats` (the last call). docs/sandbox.md explains
the isolation and the threat model.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import re
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Sequence

from tether.data.loading import DataError
from tether.rewards.base import as_text
from tether.rewards.sandbox import PYTHON_FLAGS, RUN_STATUSES, Limits, RunResult, Sandbox

log = logging.getLogger(__name__)

MODES = ("fraction", "all")
COMPARES = ("exact", "whitespace")

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
OUTCOMES = (PASSED, FAILED, *(status for status in RUN_STATUSES if status != "ok"), SKIPPED)
"""How one test ended. Besides passed/failed (wrong output, failed assert) and skipped (mode="all"
after a failure), these are the sandbox's RunResult statuses."""

SOLUTION_FILE = "solution.py"
SOURCE = "code reward input"  # how errors name the batch handed to the reward
_FENCED = re.compile(r"```(?:python3?|py)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_NAN_IN_TEST = re.compile(r"\bnan\b|isnan", re.IGNORECASE)
_CASE_KEYS = {"io": {"input", "output", "timeout"}, "assert": {"code", "timeout"}}


class CodeTestsError(DataError):
    """A row's `tests` (or `time_limit`) is missing or malformed; names the source, row and field."""


@dataclass(frozen=True)
class CodeTest:
    """One test of a row: a stdin/stdout case (`kind="io"`) or assert-style test code (`kind="assert"`)."""

    kind: str
    input: str = ""
    output: str = ""
    code: str = ""
    timeout: float | None = None
    """Seconds; None means the reward's default."""


# ---------------------------------------------------------------------------------------------
# Tests: validation (at data-load time and on every reward call)


def validate_tests(
    tests: Any, *, source: str = "<data>", row: int | None = None, time_limit: Any = None
) -> list[CodeTest]:
    """The row's tests as `CodeTest`s, or CodeTestsError naming source, row and field.

    Never guesses: a missing field, an empty list, a null expected output, an unknown key or test
    code that does not compile is an error, not a silent 0 (and never a pass)."""

    def error(message: str, field: str = "tests") -> CodeTestsError:
        return CodeTestsError(source, message, row=row, field=field)

    default_timeout = None if time_limit is None else _seconds(time_limit, error, "time_limit")
    if tests is None:
        raise error("missing or null; the code reward needs {input, output} cases or assert-style test code")
    if isinstance(tests, str) and tests.strip()[:1] in ("[", "{"):
        try:
            tests = json.loads(tests)
        except ValueError:
            pass  # not JSON: test code
    if isinstance(tests, str):
        tests = [tests]
    elif isinstance(tests, dict):
        tests = _apps_cases(tests, error)
    if not isinstance(tests, (list, tuple)) or not tests:
        raise error(f"expected a non-empty list of tests or a string of test code, got {_describe(tests)}")
    return [_case(item, f"tests[{index}]", error, default_timeout) for index, item in enumerate(tests)]


def _case(item: Any, field: str, error, default_timeout: float | None) -> CodeTest:
    if isinstance(item, str):
        item = {"code": item}
    if not isinstance(item, dict):
        raise error(f"a test must be {{input, output}}, {{code}} or test code, got {_describe(item)}", field)
    kind = "assert" if "code" in item else "io"
    unknown = sorted(set(item) - _CASE_KEYS[kind])
    if unknown:
        expected = ", ".join(sorted(_CASE_KEYS[kind]))
        what = "an assert-style" if kind == "assert" else "a stdin/stdout"
        raise error(f"unknown key(s) {unknown} in {what} test (valid: {expected})", field)
    timeout = _seconds(item["timeout"], error, f"{field}.timeout") if "timeout" in item else default_timeout
    if kind == "assert":
        code = item["code"]
        if not isinstance(code, str) or not code.strip():
            raise error(f"test code must be a non-empty string, got {_describe(code)}", f"{field}.code")
        try:
            compile(code, "<tests>", "exec")
        except SyntaxError as syntax:
            raise error(f"test code does not compile: {syntax.msg} (line {syntax.lineno})", f"{field}.code") from None
        return CodeTest("assert", code=code, timeout=timeout)
    if "output" not in item or item["output"] is None:
        message = "expected output is missing or null; a case needs the text the program must print"
        raise error(message, f"{field}.output")
    for key in ("input", "output"):
        if key in item and not isinstance(item[key], str):
            raise error(f"must be a string, got {_describe(item[key])}", f"{field}.{key}")
    return CodeTest("io", input=item.get("input", ""), output=item["output"], timeout=timeout)


def _apps_cases(tests: dict, error) -> list[dict]:
    """APPS / CodeContests style {"inputs": [...], "outputs": [...]} -> a list of {input, output}."""
    if "fn_name" in tests:
        raise error("call-based tests ('fn_name') are not supported; write them as assert-style test code")
    if set(tests) != {"inputs", "outputs"}:
        raise error(f"a dict of tests must have exactly 'inputs' and 'outputs' lists, got keys {sorted(tests)}")
    inputs, outputs = tests["inputs"], tests["outputs"]
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
        raise error("'inputs' and 'outputs' must be lists of the same length")
    return [{"input": i, "output": o} for i, o in zip(inputs, outputs)]


def _seconds(value: Any, error, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise error(f"must be a positive number of seconds, got {value!r}", field)
    return float(value)


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:80]


def extract_code(completion: str) -> str:
    """The program in a completion: the last ```python fenced block (closed or cut off), else all of it."""
    blocks = _FENCED.findall(completion)
    return blocks[-1] if blocks else completion


def outputs_match(actual: str, expected: str, compare: str) -> bool:
    """`exact`: the same text. `whitespace`: the same whitespace-separated tokens."""
    return actual == expected if compare == "exact" else actual.split() == expected.split()


# ---------------------------------------------------------------------------------------------
# Assert-style tests: the harness (runs the dataset's test code) and the solution host (runs the
# program). Both run inside one sandbox; they share only two pipes carrying plain data.

_CODEC = r'''
def encode(value, depth=0):
    """Plain data -> JSON, tagging what JSON lacks; anything else cannot cross."""
    kind = type(value)
    if depth > 100:
        raise ValueError("value nested too deeply")
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [encode(v, depth + 1) for v in value]
    if kind in (tuple, set, frozenset):
        return {kind.__name__: [encode(v, depth + 1) for v in value]}
    if kind is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    raise TypeError(f"a {kind.__name__} cannot cross to or from the solution: use plain data "
                    "(numbers, strings, lists, tuples, dicts, sets, bytes)")


def decode(data, depth=0):
    """JSON from `encode` -> values of the exact builtin types; anything malformed is refused."""
    kind = type(data)
    if depth > 100:
        raise ValueError("value nested too deeply")
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is list:
        return [decode(v, depth + 1) for v in data]
    if kind is dict and len(data) == 1:
        [(tag, items)] = data.items()
        if tag == "bytes" and type(items) is str:
            return bytes.fromhex(items)
        if tag == "complex" and type(items) is list and len(items) == 2:
            return complex(float(items[0]), float(items[1]))
        if type(items) is list:
            values = [decode(v, depth + 1) for v in items]
            if tag == "tuple":
                return tuple(values)
            if tag == "set":
                return set(values)
            if tag == "frozenset":
                return frozenset(values)
            if tag == "dict" and all(type(v) is list and len(v) == 2 for v in values):
                return {key: value for key, value in values}
    raise ValueError("malformed value")
'''

_SOLUTION_HOST = _CODEC + r'''
import builtins, json, os, sys

requests, replies = os.fdopen(3, "rb"), os.fdopen(4, "wb")


def reply(message):
    replies.write(json.dumps(message).encode() + b"\n")
    replies.flush()


def describe(error):
    try:
        return [type(error).__name__, str(error)[:2000]]
    except BaseException:
        return ["Exception", "(unprintable)"]


namespace = {"__name__": "solution", "__file__": sys.argv[1], "__builtins__": builtins}
try:
    with open(sys.argv[1]) as f:
        exec(compile(f.read(), sys.argv[1], "exec"), namespace)
except BaseException as error:
    reply({"error": describe(error)})
    sys.exit(1)
reply({"names": sorted(k for k, v in list(namespace.items()) if callable(v) and not k.startswith("__"))})
for line in requests:
    try:
        call = json.loads(line)
        message = {"value": encode(namespace[call["name"]](*decode(call["args"]), **decode(call["kwargs"])))}
    except BaseException as error:
        message = {"error": describe(error)}
    reply(message)
'''

_ASSERT_HARNESS = _CODEC + r'''
import builtins, ctypes, fcntl, json, os, signal, sys, traceback

REPLY_MAX_BYTES = 16 << 20


def has_nan(value, depth=0):
    """A NaN anywhere in a decoded value (floats, complex parts, inside containers and dict keys)."""
    kind = type(value)
    if kind is float:
        return value != value
    if kind is complex:
        return value.real != value.real or value.imag != value.imag
    if kind in (list, tuple, set, frozenset):
        return any(has_nan(v, depth + 1) for v in value)
    if kind is dict:
        return any(has_nan(k, depth + 1) or has_nan(v, depth + 1) for k, v in value.items())
    return False


class SolutionError(Exception):
    """The solution raised an exception that is not a builtin one, or sent nothing usable."""


def main():
    # Not dumpable: processes of our uid (the solution) cannot ptrace us or read our memory, fds or
    # environment through /proc. Done before the marker exists in this process.
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE
    with os.fdopen(3, "rb") as channel:
        job = json.loads(channel.read())
    marker, test_code = job["marker"], job["test"]
    nan_expected, nan_results = job["nan_expected"], []

    to_solution_r, to_solution_w = os.pipe()
    from_solution_r, from_solution_w = os.pipe()
    solution = os.fork()
    if solution == 0:  # the program's process: stdin /dev/null, stdout to our stderr, never our stdout
        request_fd, reply_fd = (fcntl.fcntl(fd, fcntl.F_DUPFD, 5) for fd in (to_solution_r, from_solution_w))
        os.dup2(request_fd, 3)  # dup2 to another number: inheritable, unlike the pipe itself
        os.dup2(reply_fd, 4)
        os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
        os.dup2(2, 1)
        os.closerange(5, 4096)
        argv = [sys.executable, *job["python_flags"], "-u", "-c", job["solution_host"], job["solution_file"]]
        os.execv(sys.executable, argv)
    os.close(to_solution_r)
    os.close(from_solution_w)
    requests, replies = os.fdopen(to_solution_w, "wb"), os.fdopen(from_solution_r, "rb")

    def receive():
        line = replies.readline(REPLY_MAX_BYTES)
        if not line.endswith(b"\n"):
            raise SolutionError("the solution process ended (or sent a reply that was cut off)")
        message = json.loads(line)
        if type(message) is not dict:
            raise SolutionError("malformed reply")
        return message

    def raise_remote(error):
        name, text = error if type(error) is list and len(error) == 2 else ("SolutionError", "malformed reply")
        kind = getattr(builtins, str(name), None)
        # StopIteration would silently end a map()/iterator in the test code (all(map(f, xs)) == True)
        builtin_error = isinstance(kind, type) and issubclass(kind, Exception)
        if not builtin_error or kind in (StopIteration, StopAsyncIteration):
            kind = SolutionError
        try:
            exception = kind(f"{text} (raised in the solution)")
        except Exception:
            exception = SolutionError(f"{name}: {text}")
        raise exception

    class Remote:
        """Stands in for one of the solution's functions: arguments go over, plain data comes back."""

        def __init__(self, name):
            self.__name__ = self.__qualname__ = name

        def __call__(self, *args, **kwargs):
            try:
                request = {"name": self.__name__, "args": encode(list(args)), "kwargs": encode(kwargs)}
                requests.write(json.dumps(request).encode() + b"\n")
                requests.flush()
            except BrokenPipeError:
                raise SolutionError("the solution process ended") from None
            reply = receive()
            if "value" in reply:
                value = decode(reply["value"])
                if not nan_expected and has_nan(value):
                    nan_results.append(self.__name__)  # NaN compares False to everything: `not f(x) > 3` holds
                return value
            raise_remote(reply.get("error"))

        def __repr__(self):
            return f"<solution function {self.__name__}>"

    try:
        hello = receive()
        if "names" not in hello:
            raise_remote(hello.get("error"))
        test_globals = {"__name__": "__main__", "__builtins__": builtins}
        for name in hello["names"][:10000]:
            # Never a builtin: a solution defining abs() or all() must not change what the test calls.
            usable = type(name) is str and name.isidentifier() and not name.startswith("__")
            if usable and not hasattr(builtins, name):
                test_globals[name] = Remote(name)
        exec(compile(test_code, "<tests>", "exec"), test_globals)
    except BaseException:
        traceback.print_exc()
        status = 1
    else:
        if nan_results:
            print(f"NaNResult: {nan_results[0]}() returned NaN and the test expects no NaN", file=sys.stderr)
            status = 1
        else:
            print(marker)  # reached only after the last assert, and only when no NaN came back
            status = 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(solution, signal.SIGKILL)
    os._exit(status)


main()
'''


def expects_nan(test_code: str) -> bool:
    """Whether assert-style test code itself expects a NaN somewhere (`math.isnan`, `float("nan")`,
    `math.nan`, `np.nan`): only then may a NaN returned by the solution pass. Elsewhere a NaN result
    fails the test, because every comparison with NaN is False and `assert not f(x) > 3` would hold."""
    return _NAN_IN_TEST.search(test_code) is not None


def _with_entry_point(test_code: str, entry_point: Any) -> str:
    """HumanEval rows: `def check(candidate)` that nobody calls, plus an `entry_point` column."""
    if isinstance(entry_point, str) and entry_point.isidentifier() and re.search(r"^def check\(", test_code, re.M):
        if not re.search(r"^check\(", test_code, re.M):
            return f"{test_code}\n\ncheck({entry_point})\n"
    return test_code


def run_test(
    sandbox: Sandbox, program: str, test: CodeTest, limits: Limits, compare: str = "whitespace"
) -> tuple[str, RunResult]:
    """Run one test of `program` in the sandbox and judge it here: (outcome, what the run produced)."""
    files = {SOLUTION_FILE: program}
    if test.kind == "io":
        result = sandbox.run(files, [SOLUTION_FILE], stdin=test.input, limits=limits)
        if result.status != "ok":
            return result.status, result
        return (PASSED if outputs_match(result.stdout, test.output, compare) else FAILED), result

    marker = secrets.token_hex(16)  # per run; travels only to the harness, on a pipe read before the program starts
    job = {
        "marker": marker,
        "test": test.code,
        "nan_expected": expects_nan(test.code),
        "python_flags": list(PYTHON_FLAGS),
        "solution_host": _SOLUTION_HOST,
        "solution_file": SOLUTION_FILE,
    }
    result = sandbox.run(files, ["-c", _ASSERT_HARNESS], fd_inputs=(json.dumps(job).encode(),), limits=limits)
    if result.status == "ok" and marker in result.stdout.splitlines():
        return PASSED, result
    if result.status in ("ok", "crash") and _last_line(result.stderr).startswith(("AssertionError", "NaNResult")):
        return FAILED, result
    return (FAILED if result.status == "ok" else result.status), result


def _last_line(text: str) -> str:
    return text.strip().rsplit("\n", 1)[-1]


# ---------------------------------------------------------------------------------------------
# The reward


def make_code_reward(
    *,
    mode: str = "fraction",
    compare: str = "whitespace",
    timeout: float = 2.0,
    memory_mb: int = 512,
    max_workers: int = 4,
    allow_weak_sandbox: bool = False,
    max_time_limit: float = 30.0,
    max_output_bytes: int = 1 << 20,
    max_processes: int = 32,
):
    """The `code` reward function (`__name__ == "code"`).

    mode: "fraction" (share of tests passed) or "all" (1.0 only if every test passes).
    compare: "whitespace" (same tokens) or "exact" (same text) for stdin/stdout tests.
    timeout: seconds per test unless the test or the row's `time_limit` says otherwise;
        `max_time_limit` caps what a dataset may ask for.
    memory_mb, max_output_bytes, max_processes: per-run limits (see `sandbox.Limits`).
    max_workers: programs running at once.
    allow_weak_sandbox: run even where full isolation is impossible (logged as a warning);
        otherwise such a machine raises SandboxUnavailable here, before any training.
    """
    if mode not in MODES:
        raise ValueError(f"code reward: mode must be one of {MODES}, got {mode!r}")
    if compare not in COMPARES:
        raise ValueError(f"code reward: compare must be one of {COMPARES}, got {compare!r}")
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"code reward: max_workers must be a positive integer, got {max_workers!r}")
    if isinstance(max_time_limit, bool) or not isinstance(max_time_limit, numbers.Real) or not max_time_limit > 0:
        raise ValueError(f"code reward: max_time_limit must be a positive number, got {max_time_limit!r}")
    limits = Limits(
        timeout=timeout, memory_mb=memory_mb, max_output_bytes=max_output_bytes, max_processes=max_processes
    )
    sandbox = Sandbox(allow_weak=bool(allow_weak_sandbox))
    pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tether-code")
    stats = {outcome: 0 for outcome in OUTCOMES}
    stats_lock = threading.Lock()

    def judge(program: str, test: CodeTest) -> str:
        test_limits = replace(limits, timeout=min(test.timeout or limits.timeout, max_time_limit))
        try:
            outcome, result = run_test(sandbox, program, test, test_limits, compare)
        except Exception as error:  # a bug or a resource failure here, never the program's doing
            log.warning("code reward: sandbox failed: %s: %s", type(error).__name__, error)
            return "sandbox_error"
        if outcome == "sandbox_error":
            log.warning("code reward: sandbox failed: %s", result.stderr.strip()[-500:])
        return outcome

    def code(
        prompts: Sequence, completions: Sequence, tests=None, time_limit=None, entry_point=None, **columns
    ) -> list[float | None]:
        started = time.monotonic()
        n = len(completions)
        if tests is None:
            raise CodeTestsError(SOURCE, "column missing: the code reward needs a 'tests' column", field="tests")
        # Every row is checked before anything runs.
        rows = [
            validate_tests(tests[i], source=SOURCE, row=i, time_limit=None if time_limit is None else time_limit[i])
            for i in range(n)
        ]
        programs = [extract_code(as_text(completion)) for completion in completions]
        futures = []
        for i, row_tests in enumerate(rows):
            entry = None if entry_point is None else entry_point[i]
            row_tests = [replace(t, code=_with_entry_point(t.code, entry)) if t.kind == "assert" else t
                         for t in row_tests]
            futures.append([pool.submit(judge, programs[i], test) for test in row_tests])

        rewards: list[float | None] = []
        counts = {outcome: 0 for outcome in OUTCOMES}
        for row_futures in futures:
            outcomes = []
            for future in row_futures:
                if mode == "all" and any(o != PASSED for o in outcomes) and future.cancel():
                    outcomes.append(SKIPPED)
                else:
                    outcomes.append(future.result())
            for outcome in outcomes:
                counts[outcome] += 1
            if "sandbox_error" in outcomes:
                rewards.append(None)  # cannot judge: the sandbox, not the program, failed
            elif mode == "all":
                rewards.append(float(all(o == PASSED for o in outcomes)))
            else:
                rewards.append(outcomes.count(PASSED) / len(outcomes))
        with stats_lock:
            for outcome, count in counts.items():
                stats[outcome] += count
        code.last_stats = {
            **counts, "completions": n, "tests": sum(map(len, futures)), "seconds": time.monotonic() - started
        }
        return rewards

    def check_rows(source: str, rows: Sequence[tuple[int, dict]]) -> None:
        """Validate every (row index, columns) of a prompt file when it is loaded, before any sampling: a
        missing or malformed `tests` or `time_limit` raises CodeTestsError naming the file, row and field."""
        for row, columns in rows:
            validate_tests(columns.get("tests"), source=source, row=row, time_limit=columns.get("time_limit"))

    code.stats = stats
    code.last_stats = {}
    code.sandbox = sandbox
    code.check_rows = check_rows
    return code
