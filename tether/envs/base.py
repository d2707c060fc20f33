"""The environment interface of multi-turn RL, and the tool-calling environment built on it.

An environment plays the other side of an episode. One instance serves ONE episode (its state is the
instance's attributes); the rollout makes a fresh one per episode:

    env = make_env()
    observation = env.reset(row)                 # text after the prompt (None: nothing), from the dataset row
    observation, reward, done = env.step(text)   # after each model turn; reward None = not judged here

Turns end where the model stops: EOS, or one of `env.stop` (e.g. "</python>"), so a tool call ends a turn.
A user's environment is a class in a Python file named in config, `env: my_env.py:Calculator`
(docs/tools.md has a 30-line example).
"""

from __future__ import annotations

import time
from typing import Callable

from tether.envs.tools import Tool, ToolCall, ToolCallError, format_observation, parse_tool_call, stop_strings


class Env:
    """The contract (subclass it, or write any class with these methods)."""

    stop: list[str] = []
    """Strings that end a model turn besides EOS (a tool call's closing tag)."""
    max_turns: int | None = None
    """Most model turns of an episode (None: the run's `max_turns`)."""

    def reset(self, row: dict) -> str | None:
        """Start an episode for a dataset row (its prompt and every other column); returns text to append
        after the prompt before the model's first turn, or None."""
        return None

    def step(self, action: str) -> tuple[str | None, float | None, bool]:
        """The model's turn `action` (its text) -> (observation text or None, reward or None, done)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the episode held (called once, when it ends)."""


class ToolEnv(Env):
    """Runs the tool calls the model writes and returns their results; a turn without a call ends the episode
    (its answer is scored by the run's reward functions). Malformed or failing calls get an error observation.

    Counts per episode: `tool_calls`, `tool_errors`, `tool_seconds`."""

    def __init__(self, tools: list[Tool], *, format: str = "tag", max_turns: int | None = None):
        self.tools = {tool.name: tool for tool in tools}
        self.format = format
        self.stop = stop_strings(format, list(self.tools))
        self.max_turns = max_turns
        self.sessions: dict = {}  # tool name -> that tool's per-episode state (e.g. the python cells)
        self.tool_calls = self.tool_errors = 0
        self.tool_seconds = 0.0

    def reset(self, row: dict) -> str | None:
        return None

    def step(self, action: str) -> tuple[str | None, float | None, bool]:
        call = parse_tool_call(action, self.format, {name: tool.argument for name, tool in self.tools.items()})
        if call is None:
            return None, None, True  # an answer, not a call: the episode is over
        self.tool_calls += 1
        start = time.perf_counter()
        if isinstance(call, ToolCallError):
            ok, result = False, call.message
        else:
            ok, result = self._run(call)
        self.tool_seconds += time.perf_counter() - start
        self.tool_errors += not ok
        return format_observation(self.format, result if ok else f"error: {result}"), None, False

    def _run(self, call: ToolCall) -> tuple[bool, str]:
        tool = self.tools[call.name]
        if tool.name not in self.sessions:
            self.sessions[tool.name] = tool.new_session()
        try:
            return tool.call(self.sessions[tool.name], call.arguments)
        except Exception as error:  # a tool's own failure is the episode's error observation, never a crash
            return False, f"{type(error).__name__}: {error}"

    def close(self) -> None:
        for name, session in self.sessions.items():
            self.tools[name].close_session(session)
        self.sessions = {}


class RewardEnv(Env):
    """The single-turn adapter: one model turn, then done. Every existing reward function scores the text
    (the rollout's reward functions), so any single-turn task runs through the episode machinery."""

    max_turns = 1

    def step(self, action: str) -> tuple[str | None, float | None, bool]:
        return None, None, True


EnvFactory = Callable[[], Env]


def env(prompts: list, completions: list, env_rewards: list | tuple = (), **columns) -> list[float]:
    """The environment's reward as a reward function: per episode the sum of the rewards its environment gave
    (column `env_rewards`, which the episode rollout hands in), 0 where it gave none. A run with `env` adds it
    to its reward functions with weight 1, so it joins the total and is logged as `reward/env`."""
    if not env_rewards:
        return [0.0] * len(completions)
    return [0.0 if reward is None else float(reward) for reward in env_rewards]
