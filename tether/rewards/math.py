"""Math answer reward: 1.0 when the completion's FINAL answer equals the row's `answer`, else 0.0.

The final answer is extracted here (`extract_answer`: the last complete `\\boxed{...}`, the last
`<answer>...</answer>`, or the last number), so intermediate numbers never count. Equivalence is
decided by math-verify (`parse` + `verify`: 1/2 == 0.5 == \\frac{1}{2}, 1,000 == 1000, x=2 == 2).

math-verify can run for ever on inputs such as `(8+1)^{(8+1)^9}`, and its own timeouts use signals
(main thread only; useless inside C big-integer arithmetic). So:

- cheap pre-checks (`costly_answer`: length, digit count, bracket nesting, exponent towers, powers of
  number literals past 100,000 digits) refuse absurd answers unread: they score 0.0 (`stats["refused"]`);
- the rest are verified by a pool of persistent worker PROCESSES (`workers`, default one per core the
  trainer may use, reused across calls), one item per worker at a time. The workers are forked by a
  template process that imported math-verify once, so a replacement costs a fork, not an import. An
  item running past `timeout` has its worker killed and replaced and scores None (`stats["timeouts"]`);
  the whole batch ends within `timeout * ceil(items / workers)` of the moment its workers are ready,
  and whatever is unfinished then scores None too. Safe to call from any thread.
"""

from __future__ import annotations

import collections
import math
import multiprocessing
import numbers
import os
import re
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import recv_handle
from typing import Any, Sequence

from tether.data.loading import DataError
from tether.rewards.base import RewardSetupError, as_text

EXTRACT_MODES = ("auto", "boxed", "answer_tag", "last_number")
TIMEOUT, BAD_REFERENCE = "timeout", "bad_reference"  # worker outcomes besides True/False

MAX_ANSWER_CHARS = 2000
"""An answer (tag content or reference) is cut to its last 2000 characters before it is read; a longer
extracted answer is refused (see `costly_answer`)."""
MAX_ANSWER_DIGITS = 1000
"""More digits than this in an answer: refused before math-verify (a 100k-digit number costs seconds)."""
MAX_ANSWER_NESTING = 12
"""Deeper nesting of {}, () and [] than this: refused (parsing recurses once per level)."""
MAX_POWER_TOWER = 2
"""Taller exponent towers than this (`a^{b^{c}}` is 3): refused. `5^{5^{5^5}}` has ~10^2184 digits and
math-verify would try to compute it; `e^{x^2}` and `2^{2^n}` are 2 and pass."""
MAX_POWER_DIGITS = 100_000
"""A power of number literals (`9^{9^9}`, `10^{10^{10}}`, `7^{7^7}`) with more digits than this: refused."""
ORPHAN_CPU_MARGIN = 10
"""CPU seconds past `timeout` after which a worker orphaned mid-item is ended by the kernel."""
WORKER_START_TIMEOUT = 120.0
"""Seconds a fresh worker may take to import math-verify (generous: a loaded machine is slow)."""

_BOXED_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE = re.compile(r"\\boxed\s+([^\s${}]+)")  # `\boxed 5`, valid LaTeX for one token
# A number: optional sign (ASCII or U+2212), thousands groups or plain digits, decimals, optional /denominator.
_NUMBER = re.compile(r"[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-\u2212]?\.\d+")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)  # escapes (\{, \\, \frac) are skipped whole
_POWER = re.compile(r"(\d+)\s*\^\s*\{?\s*(\d+)(?:\s*\^\s*\{?\s*(\d+))?")  # 9^9, 9^{9}, 9^{9^9}, 9^{9^{9}}
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


def costly_answer(answer: str) -> str | None:
    """Why `answer` is refused before math-verify sees it (cheap checks, linear in its length), else None."""
    if len(answer) > MAX_ANSWER_CHARS:
        return f"longer than {MAX_ANSWER_CHARS} characters"
    if sum(c.isdigit() for c in answer) > MAX_ANSWER_DIGITS:
        return f"more than {MAX_ANSWER_DIGITS} digits"
    for base, exponent, top in _POWER.findall(answer):
        log10_digits = _log10_power_digits(int(base), int(exponent), int(top or 1)) if int(base) > 1 else 0
        if log10_digits > math.log10(MAX_POWER_DIGITS):
            return f"a power of more than {MAX_POWER_DIGITS} digits"
    stack: list[tuple[bool, int]] = []  # per open bracket: (opens an exponent, carets in the term before it)
    carets = exponents = 0  # carets in the current term; open exponent groups around it
    previous, escaped = "", False
    for char in answer:
        if escaped:  # \{ and \} are literal braces; \frac etc. are letters
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in "{([":
            stack.append((char == "{" and previous == "^", carets))
            exponents += stack[-1][0]
            carets = 0
            if len(stack) > MAX_ANSWER_NESTING:
                return f"nested deeper than {MAX_ANSWER_NESTING} brackets"
        elif char in "})]" and stack:
            opened_exponent, carets = stack.pop()
            exponents -= opened_exponent
        elif char == "^":
            carets += 1
            if carets + exponents > MAX_POWER_TOWER:
                return f"an exponent tower taller than {MAX_POWER_TOWER}"
        elif char in "+-=,;<>" or char.isspace():
            carets = 0
        if not char.isspace():
            previous = char
    return None


def _log10_power_digits(base: int, exponent: int, top: int) -> float:
    """log10 of the number of digits of base^(exponent^top), from logarithms only (never computed)."""
    if exponent <= 1:
        return math.log10(math.log10(base))
    log10_exponent = top * math.log10(exponent) if top < 10**6 else math.inf
    return log10_exponent + math.log10(math.log10(base))


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
    costly = costly_answer(gold)
    if costly:
        return f"{costly}: answers like it are refused unread, so no completion could ever match it"
    return None


# ---------------------------------------------------------------------------------------------
# The worker process

# The program the template runs (`python -c`). A fresh interpreter rather than a fork of the trainer:
# forking a process that runs torch threads can deadlock, and multiprocessing's spawn/forkserver
# re-import the caller's __main__, which breaks every script without an `if __name__ == "__main__"`
# guard. The template imports math-verify, then on its socket takes ("fork", None) -> forks a worker,
# sends its pid and (SCM_RIGHTS) the trainer's end of a new socket to it; ("kill", pid) -> SIGKILLs
# and reaps one of its own unreaped workers (so never a reused pid); EOF -> kills all, exits.
# A worker, on its socket: says "ready", then receives lists of (gold, prediction) strings and sends
# one result per item as soon as it is known: True/False, or "bad_reference" when the gold answer
# does not parse. math-verify's own signal timeouts are off (None): the trainer enforces the
# deadline by having the template kill the worker.
_WORKER_PROGRAM = """
import logging, os, resource, signal, socket, sys
from multiprocessing.connection import Connection
from multiprocessing.reduction import send_handle

signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
template = Connection(int(sys.argv[1]))
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

def serve(connection):
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

verify(parse_boxed("1"), parse_boxed("1/1"), timeout_seconds=None)  # warm: workers fork with it all loaded
parsed.clear()
children = set()  # forked and not yet reaped: only these pids may be killed (never a reused one)
template.send("ready")
while True:
    try:
        request, pid = template.recv()
    except (EOFError, OSError):  # the parent closed the socket (or died): end every worker, then ourselves
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        break
    while children:  # reap workers that ended on their own (their parent closed their socket)
        ended, _ = os.waitpid(-1, os.WNOHANG)
        if not ended:
            break
        children.discard(ended)
    if request == "kill" and pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        children.discard(pid)
    elif request == "fork":
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            template.close()
            ours.close()
            serve(Connection(theirs.detach()))
            os._exit(0)
        children.add(pid)
        theirs.close()
        template.send(pid)
        send_handle(template, ours.fileno(), None)
        ours.close()
"""


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


def _end_template(process: subprocess.Popen, connection: Connection) -> None:
    """Close its socket (it then kills its workers and exits); kill it if it has not within 5 s."""
    connection.close()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    _kill(process)


class _Template:
    """The process that imports math-verify once and forks the workers (`_WORKER_PROGRAM`): a worker
    killed mid-item is replaced in milliseconds, not in the seconds an import takes."""

    def __init__(self, cpu_budget: int):
        if os.name != "posix":
            raise RuntimeError("the math reward's worker processes need a POSIX system (Linux, macOS)")
        parent_end, child_end = multiprocessing.Pipe()  # a socket pair on POSIX (it carries descriptors too)
        # -P: no current directory on sys.path (a user's `math.py` there would shadow the stdlib's)
        safe_path = ["-P"] if sys.version_info >= (3, 11) else []
        self.process = subprocess.Popen(
            [sys.executable, *safe_path, "-c", _WORKER_PROGRAM, str(child_end.fileno()), str(cpu_budget)],
            pass_fds=[child_end.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        child_end.close()
        self.connection = parent_end
        self._finalizer = weakref.finalize(self, _end_template, self.process, parent_end)  # also at exit
        try:
            started = parent_end.poll(WORKER_START_TIMEOUT) and parent_end.recv() == "ready"
        except (EOFError, OSError):
            started = False
        if not started:
            self.stop()
            raise RuntimeError(
                f"the math-verify worker did not start within {WORKER_START_TIMEOUT:.0f} s "
                f"(exit code {self.process.returncode}); check that `python -c 'import math_verify'` works"
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def fork(self) -> tuple[int, Connection]:
        """A new worker: its pid and a connection to it (it says "ready" first)."""
        self.connection.send(("fork", None))
        pid = self.connection.recv()
        return pid, Connection(recv_handle(self.connection))

    def kill(self, pid: int) -> None:
        try:
            self.connection.send(("kill", pid))
        except OSError:  # the template is gone; its workers end on EOF or at their CPU limit
            pass

    def stop(self) -> None:
        self._finalizer()


class _Worker:
    """One worker forked by the template, verifying one item at a time."""

    def __init__(self, template: _Template):
        self.template = template
        self.pid, self.connection = template.fork()
        self.ready = False  # says "ready" first
        self.item: int | None = None  # the index it is verifying
        self.item_deadline = math.inf

    def stop(self) -> None:
        if self.item is not None:  # busy: maybe stuck in C arithmetic; an idle one ends on EOF
            self.template.kill(self.pid)
        self.connection.close()


class _VerifyPool:
    """Persistent math-verify processes (`size` of them, started as batches need them, reused across
    calls) verifying one item each at a time. An item past `timeout` has its process killed (the item
    is TIMEOUT) and replaced; the whole batch ends within `timeout * ceil(items / processes)` of the
    moment its processes are ready: what is unfinished then is TIMEOUT. Safe to call from any thread."""

    def __init__(self, timeout: float, size: int):
        self.timeout, self.size = timeout, size
        self.cpu_budget = math.ceil(timeout) + ORPHAN_CPU_MARGIN  # only an orphan ever reaches it
        self._template: _Template | None = None
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        """Stop every process (a later call starts new ones)."""
        with self._lock:
            for worker in self._workers:
                worker.stop()
            self._workers = []
            if self._template is not None:
                self._template.stop()
                self._template = None

    def pids(self) -> list[int]:
        with self._lock:
            return [worker.pid for worker in self._workers]

    def _new_worker(self) -> _Worker:
        if self._template is None or not self._template.alive():
            if self._template is not None:
                self._template.stop()
            self._template = None
            self._template = _Template(self.cpu_budget)
        try:
            return _Worker(self._template)
        except (EOFError, OSError):  # the template died just now: once more with a fresh one
            self._template.stop()
            self._template = _Template(self.cpu_budget)
            return _Worker(self._template)

    def _replace(self, worker: _Worker) -> None:
        worker.stop()
        worker.item = None
        self._workers[self._workers.index(worker)] = self._new_worker()

    def _receive(self, worker: _Worker, results: list) -> None:
        try:
            message = worker.connection.recv()
        except (EOFError, OSError):  # died: at start-up, or on its item (e.g. out of memory: a TIMEOUT)
            worker.item = None  # nothing left to kill
            self._replace(worker)
            return
        if not worker.ready:
            worker.ready = message == "ready"
        else:
            results[worker.item] = message
            worker.item, worker.item_deadline = None, math.inf

    def _start(self, wanted: int) -> None:
        """At least `wanted` processes, and every one not yet ready waited for (raises if none starts)."""
        while len(self._workers) < wanted:
            self._workers.append(self._new_worker())
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while (starting := [w for w in self._workers if not w.ready]) and time.monotonic() < deadline:
            for connection in wait([w.connection for w in starting], deadline - time.monotonic()):
                worker = next(w for w in starting if w.connection is connection)
                try:
                    worker.ready = worker.connection.recv() == "ready"
                except (EOFError, OSError):
                    worker.stop()
                    self._workers.remove(worker)
        for worker in [w for w in self._workers if not w.ready]:
            worker.stop()
            self._workers.remove(worker)
        if not self._workers:
            raise RuntimeError(
                f"the math-verify worker did not start within {WORKER_START_TIMEOUT:.0f} s; "
                f"check that `python -c 'import math_verify'` works"
            )

    def verify(self, pairs: Sequence[tuple[str, str]]) -> list[bool | str]:
        """Results aligned with `pairs`: True/False, BAD_REFERENCE, or TIMEOUT (item or batch deadline)."""
        results: list[bool | str] = [TIMEOUT] * len(pairs)
        if not pairs:
            return results
        with self._lock:
            self._start(min(self.size, len(pairs)))
            batch_deadline = time.monotonic() + self.timeout * math.ceil(len(pairs) / len(self._workers))
            queue = collections.deque(range(len(pairs)))
            while True:
                now = time.monotonic()
                for worker in [w for w in self._workers if w.ready and w.item is None]:
                    if not queue or now >= batch_deadline:
                        break
                    worker.item, worker.item_deadline = queue.popleft(), min(now + self.timeout, batch_deadline)
                    try:
                        worker.connection.send([pairs[worker.item]])
                    except OSError:  # died while idle: the item goes back to the front
                        queue.appendleft(worker.item)
                        self._replace(worker)
                busy = [w for w in self._workers if w.item is not None]
                if now >= batch_deadline or not (busy or queue):
                    break
                waiting = [w for w in self._workers if w.item is not None or not w.ready]
                until = min([w.item_deadline for w in busy] + [batch_deadline])
                for connection in wait([w.connection for w in waiting], max(0.0, until - now)):
                    self._receive(next(w for w in waiting if w.connection is connection), results)
                now = time.monotonic()
                for worker in [w for w in self._workers if w.item is not None and now >= w.item_deadline]:
                    self._replace(worker)  # its item stays TIMEOUT; the others go on meanwhile
            for worker in [w for w in self._workers if w.item is not None]:
                self._replace(worker)  # past the batch deadline
        return results


# ---------------------------------------------------------------------------------------------
# The reward


def make_math_reward(
    extract: str = "auto",
    timeout: float = 5.0,
    answer_tag: str = "answer",
    answer_column: str = "answer",
    workers: int | None = None,
):
    """Build the `math` reward.

    Args:
        extract: how to find the completion's final answer: `auto` (answer tag, else last
            \\boxed{}, else last number), `boxed`, `answer_tag` or `last_number`.
        timeout: seconds one comparison may take; past it the row scores None (a timeout).
        answer_tag: the tag read by `answer_tag` / `auto`.
        answer_column: the dataset column holding the reference answer.
        workers: math-verify processes verifying at once (default: the cores this process may use).

    Scores: 1.0 equal, 0.0 different, no answer found in the completion, or an answer refused
    unread as absurd (`costly_answer`), None when the comparison timed out (its own `timeout`, or
    the batch's `timeout * ceil(answers / workers)`) or the reference answer is missing/unparseable
    (counted in `stats`).
    """
    if extract not in EXTRACT_MODES:
        raise ValueError(f"math reward: extract must be one of {EXTRACT_MODES}, got {extract!r}")
    if not timeout or timeout <= 0:
        raise ValueError(f"math reward: timeout must be a positive number of seconds, got {timeout!r}")
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"math reward: workers must be a positive integer, got {workers!r}")
    pool = _VerifyPool(float(timeout), workers)
    stats = {"timeouts": 0, "no_answer": 0, "bad_reference": 0, "refused": 0}

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
            elif costly_answer(prediction):
                stats["refused"] += 1
                scores[index] = 0.0
            else:
                jobs.setdefault((gold, prediction), []).append(index)
        if jobs:
            for rows, result in zip(jobs.values(), pool.verify(list(jobs))):
                if result in (TIMEOUT, BAD_REFERENCE):
                    stats["timeouts" if result == TIMEOUT else "bad_reference"] += len(rows)
                    continue
                for index in rows:
                    scores[index] = 1.0 if result else 0.0
        return scores

    def check_rows(source: str, rows: Sequence[tuple[int, dict]]) -> None:
        """Validate every (row index, columns) of a prompt file when it is loaded, before any sampling: a
        missing, empty, NaN or infinite reference answer raises DataError naming file, row and field (the
        command line prints it as one line and exits 2)."""
        for row, columns in rows:
            problem = reference_problem(columns.get(answer_column))
            if answer_column not in columns:
                problem = "missing; the math reward reads the reference answer from it (or set answer_column)"
            if problem:
                raise DataError(source, problem, row=row, field=answer_column)

    math_reward.__name__ = "math"
    math_reward.check_rows = check_rows
    math_reward.stats = stats
    math_reward.close = pool.close
    math_reward.pool = pool
    return math_reward
