"""Math answer reward: 1.0 when the completion's FINAL answer equals the row's `answer`, else 0.0.

The final answer is extracted here (`extract_answer`: the last complete `\\boxed{...}`, the last
`<answer>...</answer>`, or the last number), so intermediate numbers never count. Equivalence is
decided by math-verify (`parse` + `verify`: 1/2 == 0.5 == \\frac{1}{2}, 1,000 == 1000, x=2 == 2).

math-verify can run for ever on inputs such as `5^{5^{5^5}}`, and its own timeouts use signals
(main thread only; useless inside C big-integer arithmetic). So parse/verify run in a persistent
worker PROCESS, one batch per round-trip, streaming one result back per item. Each item has its own
deadline: when one runs past `timeout`, the worker is killed, that item scores None (counted in
`stats["timeouts"]`) and the items after it are retried in a fresh worker. Safe to call from any thread.
"""

from __future__ import annotations

import math
import multiprocessing
import numbers
import os
import re
import subprocess
import sys
import threading
import weakref
from typing import Any, Sequence

from tether.data.loading import DataError
from tether.rewards.base import RewardSetupError, as_text

class BadReferenceError(DataError):
    """A row's reference answer is missing, empty, NaN or infinite; names the file, row and field."""


EXTRACT_MODES = ("auto", "boxed", "answer_tag", "last_number")
TIMEOUT, BAD_REFERENCE = "timeout", "bad_reference"  # worker outcomes besides True/False

MAX_ANSWER_CHARS = 2000
"""An answer (tag content or reference) is cut to its last 2000 characters before it is read."""
ORPHAN_CPU_MARGIN = 10
"""CPU seconds past `timeout` after which a worker orphaned mid-item is ended by the kernel."""
WORKER_START_TIMEOUT = 120.0
"""Seconds a fresh worker may take to import math-verify (generous: a loaded machine is slow)."""

_BOXED_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE = re.compile(r"\\boxed\s+([^\s${}]+)")  # `\boxed 5`, valid LaTeX for one token
# A number: optional sign (ASCII or U+2212), thousands groups or plain digits, decimals, optional /denominator.
_NUMBER = re.compile(r"[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-\u2212]?\.\d+")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)  # escapes (\{, \\, \frac) are skipped whole
_NON_FINITE = re.compile(r"[-+]?(?:nan|inf|infinity)", re.IGNORECASE)  # how Python and JSON spell them
_MATH_SEGMENT = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)


# ---------------------------------------------------------------------------------------------
# Extraction (pure, in the calling process)


def _last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` (nested braces matched).

    One pass over the braces (linear even for a degenerate completion repeating `\\boxed{`).
    """
    opens = {match.end() - 1: match.start() for match in _BOXED_START.finditer(text)}  # "{" -> box start
    best: tuple[int, int, int] | None = None  # (box start, content start, content end)
    if opens:
        stack: list[tuple[int, int] | None] = []  # per open brace: (box start, content start) or None
        for token in _BRACE_OR_ESCAPE.finditer(text):
            if token.group() == "{":
                box_start = opens.get(token.start())
                stack.append(None if box_start is None else (box_start, token.end()))
            elif token.group() == "}" and stack:
                box = stack.pop()
                if box is not None and (best is None or box[0] > best[0]):
                    best = (box[0], box[1], token.start())
    bare = None
    for bare in _BOXED_BARE.finditer(text):
        pass
    if bare is not None and (best is None or bare.start() > best[0]):
        return bare.group(1)
    return text[best[1] : best[2]].strip() if best is not None else None


def _last_tag(text: str, tag: str) -> str | None:
    """Content of the last complete `<tag>...</tag>` (the last close and the last open before it)."""
    end = text.rfind(f"</{tag}>")
    start = text.rfind(f"<{tag}>", 0, end) if end >= 0 else -1
    return text[start + len(tag) + 2 : end] if start >= 0 else None


def _last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return matches[-1].replace(",", "").replace("\u2212", "-") if matches else None


def _clean(answer: str) -> str | None:
    """Reduce free text to its math: the last \\boxed, else the last $...$ segment; strip a final period."""
    answer = answer[-MAX_ANSWER_CHARS:]  # bounds the $...$ search; a longer "answer" is not one
    boxed = _last_boxed(answer)
    if boxed is not None:
        answer = boxed
    else:
        segments = _MATH_SEGMENT.findall(answer)
        if segments:
            answer = next(part for part in segments[-1] if part)
    answer = answer.strip().rstrip(".").strip()
    return answer or None


def extract_answer(text: str, mode: str = "auto", tag: str = "answer") -> str | None:
    """The final answer in `text`, or None when there is none.

    - `boxed`: the content of the last complete `\\boxed{...}` (nested braces matched).
    - `answer_tag`: the content of the last `<tag>...</tag>`; inside it, a `\\boxed{}` or a `$...$`
      segment is preferred to the surrounding words.
    - `last_number`: the last number (`-3`, `1,000` -> `1000`, `2.5`, `3/4`).
    - `auto`: `answer_tag`, else `boxed`, else `last_number`.
    """
    if mode not in EXTRACT_MODES:
        raise ValueError(f"extract mode must be one of {EXTRACT_MODES}, got {mode!r}")
    if mode in ("auto", "answer_tag"):
        content = _last_tag(text, tag)
        if content is not None:
            return _clean(content)
        if mode == "answer_tag":
            return None
    if mode in ("auto", "boxed"):
        boxed = _last_boxed(text)
        if boxed is not None:
            return boxed.rstrip(".").strip() or None
        if mode == "boxed":
            return None
    return _last_number(text)


def _reference(answer: Any) -> str | None:
    """The gold answer as math text: a GSM8K `#### 42` tail, a \\boxed{} or $...$ are unwrapped.
    None when there is none, or when it is NaN or infinite (`reference_problem` says which)."""
    return None if reference_problem(answer) else _reduce_reference(answer)


def _reduce_reference(answer: Any) -> str | None:
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return _clean(text)


def reference_problem(answer: Any) -> str | None:
    """Why `answer` cannot be a reference answer, in words, or None when it can.

    Refused: missing/null, empty (also an empty `####` tail or `\\boxed{}`), and NaN or infinite
    numbers, including their spellings as text (`nan`, `inf`, `-Infinity`): JSON `NaN` would
    match `\\boxed{nan}` and JSON `Infinity` would match `\\boxed{\\infty}`. LaTeX written on
    purpose (`\\infty`, `(-\\infty, 3]`) is a real answer and accepted."""
    if answer is None:
        return "missing or null; every row needs its reference answer"
    if isinstance(answer, numbers.Real) and not isinstance(answer, bool) and not math.isfinite(answer):
        return f"{answer!r} is not a finite number; a NaN or infinite reference would reward a NaN or \\infty answer"
    gold = _reduce_reference(answer)
    if gold is None:
        return f"empty ({str(answer)[:40]!r}); every row needs its reference answer"
    if _NON_FINITE.fullmatch(gold):
        return f"{gold!r} is not a finite number; a NaN or infinite reference would reward a NaN or \\infty answer"
    return None


# ---------------------------------------------------------------------------------------------
# The worker process

# The program the worker runs (`python -c`). A fresh interpreter rather than a fork: forking a
# process that runs torch threads can deadlock, and multiprocessing's spawn/forkserver re-import
# the caller's __main__, which breaks every script without an `if __name__ == "__main__"` guard.
# Protocol on one socket: receive a list of (gold, prediction) strings, send one result per item as
# soon as it is known: True/False, or "bad_reference" when the gold answer does not parse.
# math-verify's own signal timeouts are off (None): the parent enforces the deadline by killing us.
_WORKER_PROGRAM = """
import logging, resource, signal, sys
from multiprocessing.connection import Connection

signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
connection = Connection(int(sys.argv[1]))
cpu_budget = int(sys.argv[2])

def allow_cpu_seconds(seconds):
    # Backstop for an orphan (parent killed with SIGKILL) stuck in C arithmetic, where no Python
    # thread or signal handler can run: the kernel ends us (SIGXCPU) past this much CPU time.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    soft = int(usage.ru_utime + usage.ru_stime) + seconds
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))

logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" warnings
from math_verify import parse, verify

parsed = {}
def parse_boxed(text):
    if text not in parsed:
        if len(parsed) > 100_000:
            parsed.clear()
        parsed[text] = parse("\\\\boxed{" + text + "}", parsing_timeout=None)
    return parsed[text]

connection.send("ready")
while True:
    try:
        batch = connection.recv()
    except (EOFError, OSError):  # the parent closed the socket
        break
    for gold, prediction in batch:
        allow_cpu_seconds(cpu_budget)
        try:
            gold_parsed = parse_boxed(gold)
            if not gold_parsed:
                result = "bad_reference"
            else:
                result = bool(verify(gold_parsed, parse_boxed(prediction), timeout_seconds=None))
        except Exception:  # math-verify failing on a prediction: a wrong answer
            result = False
        connection.send(result)
"""


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


class _VerifyWorker:
    """A persistent math-verify process with a per-item deadline; see the module docstring."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.cpu_budget = math.ceil(timeout) + ORPHAN_CPU_MARGIN  # only an orphan ever reaches it
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._connection = None
        self._finalizer = None

    def _start(self) -> None:
        if os.name != "posix":
            raise RuntimeError("the math reward's worker process needs a POSIX system (Linux, macOS)")
        parent_end, child_end = multiprocessing.Pipe()  # a socket pair on POSIX
        # -P: no current directory on sys.path (a user's `math.py` there would shadow the stdlib's)
        safe_path = ["-P"] if sys.version_info >= (3, 11) else []
        process = subprocess.Popen(
            [sys.executable, *safe_path, "-c", _WORKER_PROGRAM, str(child_end.fileno()), str(self.cpu_budget)],
            pass_fds=[child_end.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        child_end.close()
        try:
            started = parent_end.poll(WORKER_START_TIMEOUT) and parent_end.recv() == "ready"
        except (EOFError, OSError):
            started = False
        if not started:
            _kill(process)
            parent_end.close()
            raise RuntimeError(
                f"the math-verify worker did not start within {WORKER_START_TIMEOUT:.0f} s "
                f"(exit code {process.returncode}); check that `python -c 'import math_verify'` works"
            )
        self._process, self._connection = process, parent_end
        self._finalizer = weakref.finalize(self, _kill, process)

    def _stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # kills the process
        if self._connection is not None:
            self._connection.close()
        self._process = self._connection = self._finalizer = None

    def close(self) -> None:
        """Stop the worker process (a later call starts a new one)."""
        with self._lock:
            self._stop()

    def verify(self, pairs: Sequence[tuple[str, str]]) -> list[bool | str]:
        """Results aligned with `pairs`: True/False, BAD_REFERENCE, or TIMEOUT past the deadline."""
        results: list[bool | str] = [TIMEOUT] * len(pairs)
        pending = list(range(len(pairs)))
        with self._lock:
            while pending:
                if self._process is None or self._process.poll() is not None:
                    self._stop()
                    self._start()
                self._connection.send([pairs[i] for i in pending])
                for position, index in enumerate(pending):
                    # Deadline per item, counted from the previous result (or from the send).
                    try:
                        ready = self._connection.poll(self.timeout)
                        if ready:
                            results[index] = self._connection.recv()
                    except (EOFError, OSError):  # the worker died on this item (e.g. out of memory)
                        ready = False
                    if not ready:  # kill it; retry the items after this one in a fresh worker
                        self._stop()
                        pending = pending[position + 1 :]
                        break
                else:
                    pending = []
        return results


# ---------------------------------------------------------------------------------------------
# The reward


def make_math_reward(
    extract: str = "auto",
    timeout: float = 5.0,
    answer_tag: str = "answer",
    answer_column: str = "answer",
):
    """Build the `math` reward.

    Args:
        extract: how to find the completion's final answer: `auto` (answer tag, else last
            \\boxed{}, else last number), `boxed`, `answer_tag` or `last_number`.
        timeout: seconds one comparison may take; past it the row scores None (a timeout).
        answer_tag: the tag read by `answer_tag` / `auto`.
        answer_column: the dataset column holding the reference answer.

    Scores: 1.0 equal, 0.0 different or no answer found in the completion, None when the
    comparison timed out or the reference answer is missing/unparseable (counted in `stats`).
    """
    if extract not in EXTRACT_MODES:
        raise ValueError(f"math reward: extract must be one of {EXTRACT_MODES}, got {extract!r}")
    if not timeout or timeout <= 0:
        raise ValueError(f"math reward: timeout must be a positive number of seconds, got {timeout!r}")
    worker = _VerifyWorker(float(timeout))
    stats = {"timeouts": 0, "no_answer": 0, "bad_reference": 0}

    def math_reward(prompts: Sequence, completions: Sequence, **columns) -> list[float | None]:
        if answer_column not in columns:
            raise RewardSetupError(
                f"the math reward needs a '{answer_column}' column with the reference answers; "
                f"this batch has columns: {sorted(columns) or 'none'}. Add it to the dataset "
                f"or set answer_column."
            )
        golds = [_reference(answer) for answer in columns[answer_column]]
        predictions = [extract_answer(as_text(c), extract, answer_tag) for c in completions]

        scores: list[float | None] = [None] * len(completions)
        jobs: dict[tuple[str, str], list[int]] = {}  # identical (gold, prediction) pairs verified once
        for index, (gold, prediction) in enumerate(zip(golds, predictions)):
            if gold is None:
                stats["bad_reference"] += 1
            elif prediction is None:
                stats["no_answer"] += 1
                scores[index] = 0.0
            else:
                jobs.setdefault((gold, prediction), []).append(index)
        if jobs:
            for rows, result in zip(jobs.values(), worker.verify(list(jobs))):
                if result in (TIMEOUT, BAD_REFERENCE):
                    stats["timeouts" if result == TIMEOUT else "bad_reference"] += len(rows)
                    continue
                for index in rows:
                    scores[index] = 1.0 if result else 0.0
        return scores

    def check_rows(source: str, rows: Sequence[tuple[int, dict]]) -> None:
        """Validate every (row index, columns) of a prompt file when it is loaded, before any sampling: a
        missing, empty, NaN or infinite reference answer raises BadReferenceError naming file, row and field."""
        for row, columns in rows:
            problem = reference_problem(columns.get(answer_column))
            if answer_column not in columns:
                problem = "missing; the math reward reads the reference answer from it (or set answer_column)"
            if problem:
                raise BadReferenceError(source, problem, row=row, field=answer_column)

    math_reward.__name__ = "math"
    math_reward.check_rows = check_rows
    math_reward.stats = stats
    math_reward.close = worker.close
    return math_reward
