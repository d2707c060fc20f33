"""Tool calls: the two formats a model writes them in, their observations, and the built-in tools.

Formats
- "tag" (for small models): `<calculator>12*34</calculator>`, `<python>print(2**10)</python>`, or a named call
  `<tool>{"name": "calculator", "arguments": {"expression": "12*34"}}</tool>`. Observation: `<output>…</output>`.
- "json" (what Qwen/Llama chat templates emit for `apply_chat_template(tools=…)`):
  `<tool_call>{"name": "calculator", "arguments": {"expression": "12*34"}}</tool_call>`.
  Observation: `<tool_response>…</tool_response>` (Qwen's tool-result wrapping).
A call is read from the END of the turn (the turn stops at the closing tag). Anything unreadable (bad JSON, an
unknown tool, a missing argument, an unclosed tag) is a `ToolCallError`, which becomes an error observation.
"""

from __future__ import annotations

import ast
import json
import operator
import warnings
from dataclasses import dataclass
from typing import Any

FORMATS = ("tag", "json")
OBSERVATION_TAGS = {"tag": ("<output>", "</output>"), "json": ("<tool_response>", "</tool_response>")}
CALL_TAGS = {"tag": "tool", "json": "tool_call"}


@dataclass
class ToolCall:
    name: str
    arguments: dict


@dataclass
class ToolCallError:
    message: str


class Tool:
    """A tool: a name, its one main argument (what a tag call's body is), and `call(session, arguments)`
    -> (ok, text). `new_session()` makes the per-episode state, `close_session` releases it."""

    name: str = ""
    argument: str = ""
    description: str = ""

    def new_session(self) -> Any:
        return None

    def call(self, session: Any, arguments: dict) -> tuple[bool, str]:
        raise NotImplementedError

    def close_session(self, session: Any) -> None:
        pass

    def schema(self) -> dict:
        """The JSON schema chat templates take in `apply_chat_template(tools=[...])`."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object", "properties": {self.argument: {"type": "string"}},
                           "required": [self.argument]}}}


def stop_strings(format: str, tool_names: list[str]) -> list[str]:
    """The closing tags that end a model turn."""
    if format == "json":
        return ["</tool_call>"]
    return [f"</{name}>" for name in tool_names] + ["</tool>"]


def format_observation(format: str, text: str) -> str:
    opening, closing = OBSERVATION_TAGS[format]
    return f"{opening}{text}{closing}"


def parse_tool_call(text: str, format: str, tools: dict[str, str]) -> ToolCall | ToolCallError | None:
    """The call at the end of a model turn: a ToolCall, a ToolCallError (malformed), or None (no call: an answer).
    `tools` maps each tool's name to its main argument (what a tag call's body is).

    >>> parse_tool_call("<calculator>2+3</calculator>", "tag", {"calculator": "expression"})
    ToolCall(name='calculator', arguments={'expression': '2+3'})
    """
    text = text.rstrip()
    wrapper = CALL_TAGS[format]
    named = [wrapper] + ([] if format == "json" else list(tools))
    for name in named:
        opening, closing = f"<{name}>", f"</{name}>"
        start = text.rfind(opening)
        if start < 0:
            continue
        if not text.endswith(closing):
            return ToolCallError(f"unclosed {opening}: end the call with {closing}")
        body = text[start + len(opening):-len(closing)]
        if name != wrapper:
            return ToolCall(name, {tools[name]: body})
        return _named_call(body.strip(), list(tools))
    return None


def _named_call(body: str, tool_names: list[str]) -> ToolCall | ToolCallError:
    try:
        data = json.loads(body)
    except json.JSONDecodeError as error:
        return ToolCallError(f"the tool call is not valid JSON ({error.msg} at character {error.pos})")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return ToolCallError('a tool call is {"name": ..., "arguments": {...}}')
    name, arguments = data["name"], data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some templates emit the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return ToolCallError("the tool call's arguments are not valid JSON")
    if name not in tool_names:
        return ToolCallError(f"unknown tool {name!r}; the tools are {', '.join(tool_names)}")
    if not isinstance(arguments, dict):
        return ToolCallError("the tool call's arguments must be a JSON object")
    return ToolCall(name, arguments)


# ----------------------------------------------------------------------------- calculator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPONENT = 64  # 9**64 has 62 digits: big enough for any worked example, small enough to never hang
MAX_EXPRESSION_CHARS = 200


def calculate(expression: str) -> int | float:
    """Evaluate + - * / // % ** and parentheses on numbers (no names, no calls): never runs code."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        with warnings.catch_warnings():  # e.g. "3x4" warns "invalid decimal literal" before failing
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression.strip()!r}") from None

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent larger than {MAX_EXPONENT}")
            return _BINARY[type(node.op)](left, right)
        raise ValueError(f"only numbers and + - * / // % ** ( ) are allowed, got {ast.unparse(node)!r}")

    return value(tree.body)


class Calculator(Tool):
    name, argument = "calculator", "expression"
    description = "Evaluate an arithmetic expression with + - * / // % ** and parentheses."

    def call(self, session, arguments: dict) -> tuple[bool, str]:
        expression = arguments.get(self.argument)
        if not isinstance(expression, str):
            return False, f"calculator needs the argument {self.argument!r} (a string)"
        try:
            result = calculate(expression)
        except (ValueError, ArithmeticError) as error:
            return False, str(error)
        if isinstance(result, float) and result.is_integer():
            result = int(result)
        return True, str(result)

