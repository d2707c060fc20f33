"""The `python` tool: the model's code runs in tether's code sandbox (`tether.rewards.sandbox`), with the same
limits and isolation as the `code` reward, and keeps its state across the turns of one episode.

State is kept by replay: a session is the list of the episode's cells that ran without error; each call runs a
fresh sandbox that executes those cells again (their output discarded) and then the new cell, printing its
output and, as a REPL does, the value of a final expression. Every call is a new isolated process tree, so
nothing outlives the call and episodes never share anything; the price is re-running earlier cells (the
timeout covers the replay too) and that their side effects (randomness, time) happen again.
"""

from __future__ import annotations

import json
from dataclasses import replace

from tether.envs.tools import Tool
from tether.rewards.sandbox import Limits, Sandbox

# Runs inside the sandbox: the cells arrive as JSON on stdin; the last one is the new cell.
CELL_RUNNER = r'''
import ast, contextlib, io, json, sys
cells = json.loads(sys.stdin.read())
scope = {"__name__": "__main__"}
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    for cell in cells[:-1]:
        exec(compile(cell, "<cell>", "exec"), scope)
tree = ast.parse(cells[-1], "<cell>")
last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
exec(compile(tree, "<cell>", "exec"), scope)
if last is not None:
    value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), scope)
    if value is not None:
        print(repr(value))
'''
MAX_OBSERVATION_CHARS = 1000  # what the model reads of a cell's output (the tail of an error)


class PythonTool(Tool):
    """Options: timeout (s per call, replay included), memory_mb, max_output_bytes, max_processes,
    allow_weak_sandbox (as the `code` reward)."""

    name, argument = "python", "code"
    description = "Run Python code; state persists across calls in one episode. Print what you need to see."

    def __init__(self, *, timeout: float = 2.0, memory_mb: int = 512, max_output_bytes: int = 1 << 16,
                 max_processes: int = 32, allow_weak_sandbox: bool = False):
        self.limits = Limits(timeout=timeout, memory_mb=memory_mb, max_output_bytes=max_output_bytes,
                             max_processes=max_processes)
        self.sandbox = Sandbox(allow_weak=bool(allow_weak_sandbox))

    def new_session(self) -> list[str]:
        return []  # the episode's cells that ran cleanly

    def call(self, session: list[str], arguments: dict) -> tuple[bool, str]:
        code = arguments.get(self.argument)
        if not isinstance(code, str):
            return False, f"python needs the argument {self.argument!r} (a string)"
        result = self.sandbox.run({"runner.py": CELL_RUNNER}, ["runner.py"], stdin=json.dumps(session + [code]),
                                  limits=replace(self.limits))
        if result.status == "ok":
            session.append(code)
            return True, result.stdout[-MAX_OBSERVATION_CHARS:].rstrip("\n")
        if result.status == "timeout":
            return False, f"the program ran past {self.limits.timeout:g} s and was stopped"
        if result.status == "memory":
            return False, f"the program ran out of memory ({self.limits.memory_mb} MB)"
        if result.status == "output_limit":
            return False, f"the program wrote more than {self.limits.max_output_bytes} bytes and was stopped"
        if result.status == "sandbox_error":
            raise RuntimeError(f"the sandbox failed: {result.stderr.strip()[-300:]}")
        lines = result.stderr.strip().splitlines()
        return False, (lines[-1] if lines else f"exit status {result.returncode}")[-MAX_OBSERVATION_CHARS:]
