"""Environments and tools for multi-turn RL (docs/tools.md).

    make_env = get_env("calculator")              # or "python", "single_turn", "my_env.py:Calculator"
    env = make_env()                               # one per episode
    env.reset(row); env.step(text) -> (observation, reward | None, done)

Built-ins: `calculator` and `python` (tool calls in the tag or JSON format, run by `ToolEnv`; python in the
code sandbox), `calculator+python` (both), and `single_turn` (one turn, scored by the reward functions).
A user's environment is `path/to/file.py:ClassName` (or `package.module:ClassName`): a class with
`reset(row)` and `step(text)`, constructed once per episode with the config's `env_options`.
"""

from __future__ import annotations

import functools

from tether.envs.base import Env, EnvFactory, RewardEnv, ToolEnv, env
from tether.envs.python import PythonTool
from tether.envs.tools import FORMATS, Calculator, Tool, ToolCall, ToolCallError, calculate, parse_tool_call
from tether.rewards.user import load_user_reward

TOOLS = {"calculator": Calculator, "python": PythonTool}
BUILTIN_ENVS = ("calculator", "python", "calculator+python", "single_turn")


def get_env(name: str, *, format: str = "tag", max_turns: int | None = None, **options) -> EnvFactory:
    """A factory of per-episode environments. Built-in tool environments take `format` (tag | json) and the
    tools' options (python: timeout, memory_mb, ...); a user's class takes `options` as keyword arguments."""
    if format not in FORMATS:
        raise ValueError(f"env: tool-call format must be one of {', '.join(FORMATS)}, got {format!r}")
    if name == "single_turn":
        return RewardEnv
    if name in BUILTIN_ENVS:
        tools = [TOOLS[tool](**(options if tool == "python" else {})) for tool in name.split("+")]
        if options and "python" not in name:
            raise ValueError(f"env {name!r} takes no options besides format and max_turns, got {sorted(options)}")
        return functools.partial(ToolEnv, tools, format=format, max_turns=max_turns)
    if ":" not in name:
        raise ValueError(f"env {name!r} is unknown: use one of {', '.join(BUILTIN_ENVS)} or path/to/file.py:Class")
    cls = load_user_reward(name)  # the same loader as a user's reward: file.py:Name or package.module:Name
    for method in ("reset", "step"):
        if not callable(getattr(cls, method, None)):
            raise ValueError(f"env {name!r}: {getattr(cls, '__name__', cls)!r} has no {method}() method; an "
                             "environment is a class with reset(row) and step(text) (docs/tools.md)")
    return functools.partial(cls, **options)


__all__ = ["BUILTIN_ENVS", "FORMATS", "TOOLS", "Calculator", "Env", "EnvFactory", "PythonTool", "RewardEnv", "Tool",
           "ToolCall", "ToolCallError", "ToolEnv", "calculate", "env", "get_env", "parse_tool_call"]
