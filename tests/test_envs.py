"""Environments and tools for multi-turn RL: tool-call parsing (both formats, malformed calls), the calculator,
the python tool in the real sandbox (state persists within an episode and not across; a hanging program is
stopped and reported), the single-turn adapter and a user's environment file."""

from __future__ import annotations

import sys
import time

import pytest

from tether.envs import ToolCall, ToolCallError, calculate, get_env, parse_tool_call
from tether.rewards import sandbox as sandbox_module

TOOLS = {"calculator": "expression", "python": "code"}


@pytest.mark.parametrize("text, expected", [
    ("<calculator>123*456</calculator>", ToolCall("calculator", {"expression": "123*456"})),
    ("think first <python>x = 1\nprint(x)</python>\n", ToolCall("python", {"code": "x = 1\nprint(x)"})),
    ('<tool>{"name": "calculator", "arguments": {"expression": "2+2"}}</tool>',
     ToolCall("calculator", {"expression": "2+2"})),
    ("<answer>42</answer>", None),  # no call: an answer
])
def test_tag_format_calls(text, expected):
    assert parse_tool_call(text, "tag", TOOLS) == expected


def test_json_format_calls_as_qwen_emits_them():
    text = '<tool_call>\n{"name": "python", "arguments": {"code": "print(1)"}}\n</tool_call>'
    assert parse_tool_call(text, "json", TOOLS) == ToolCall("python", {"code": "print(1)"})
    as_string = '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1+1\\"}"}</tool_call>'
    assert parse_tool_call(as_string, "json", TOOLS) == ToolCall("calculator", {"expression": "1+1"})
    assert parse_tool_call("<calculator>1+1</calculator>", "json", TOOLS) is None  # not this format's call


@pytest.mark.parametrize("text, message", [
    ("<tool_call>{name: calculator}</tool_call>", "not valid JSON"),
    ('<tool_call>{"name": "search", "arguments": {}}</tool_call>', "unknown tool 'search'"),
    ('<tool_call>{"arguments": {}}</tool_call>', '{"name": ..., "arguments": {...}}'),
    ('<tool_call>{"name": "python", "arguments": [1]}</tool_call>', "must be a JSON object"),
    ('<tool_call>{"name": "python"', "unclosed <tool_call>"),
])
def test_malformed_calls_are_errors(text, message):
    call = parse_tool_call(text, "json", TOOLS)
    assert isinstance(call, ToolCallError) and message in call.message


def test_malformed_calls_become_error_observations_never_crashes():
    env = get_env("calculator", format="json")()
    for text in ["<tool_call>{oops</tool_call>", '<tool_call>{"name": "calculator", "arguments": {}}</tool_call>',
                 '<tool_call>{"name": "calculator", "arguments": {"expression": "__import__(\'os\')"}}</tool_call>']:
        observation, reward, done = env.step(text)
        assert observation.startswith("<tool_response>error: ") and reward is None and not done
    assert (env.tool_calls, env.tool_errors) == (3, 3)
    assert env.step("The answer is 4.") == (None, None, True)


def test_calculator_values():
    assert calculate("123*456") == 56088
    assert calculate("-(7 - 10) ** 2 // 4 % 5") == (-9 // 4) % 5 == 2
    assert calculate("(2+3)*4") == 20 and calculate("7/2") == 3.5 and calculate("2**10") == 1024
    for bad in ["abs(-1)", "x + 1", "2**1000", "'a' * 3", "1 +"]:
        with pytest.raises(ValueError):
            calculate(bad)
    env = get_env("calculator")()
    assert env.step("<calculator>6/3</calculator>") == ("<output>2</output>", None, False)
    assert env.step("<calculator>1/0</calculator>")[0] == "<output>error: division by zero</output>"


def test_single_turn_adapter_ends_after_one_turn():
    env = get_env("single_turn")()
    assert env.reset({"prompt": "1+1="}) is None
    assert env.step("2") == (None, None, True) and env.max_turns == 1


def test_user_environment_file(tmp_path):
    (tmp_path / "my_env.py").write_text(
        "class Guess:\n"
        "    stop = ['</guess>']\n"
        "    def __init__(self, secret=7):\n        self.secret, self.tries = secret, 0\n"
        "    def reset(self, row):\n        self.secret = row.get('secret', self.secret)\n        return None\n"
        "    def step(self, text):\n"
        "        self.tries += 1\n"
        "        guess = int(text.removesuffix('</guess>').split('<guess>')[-1])\n"
        "        if guess == self.secret:\n            return None, 1.0, True\n"
        "        return ('higher' if guess < self.secret else 'lower'), None, False\n")
    make_env = get_env(f"{tmp_path}/my_env.py:Guess", secret=3)
    first, second = make_env(), make_env()
    first.reset({"secret": 5})
    assert first.step("<guess>2</guess>") == ("higher", None, False)
    assert first.step("<guess>5</guess>") == (None, 1.0, True)
    assert second.step("<guess>3</guess>") == (None, 1.0, True) and second.tries == 1  # its own state
    (tmp_path / "bad.py").write_text("class NotAnEnv:\n    pass\n")
    with pytest.raises(ValueError, match="has no reset"):
        get_env(f"{tmp_path}/bad.py:NotAnEnv")
    with pytest.raises(ValueError, match="unknown"):
        get_env("calculater")


# ----------------------------------------------------------------------------- python tool, real sandbox

needs_sandbox = pytest.mark.skipif(sys.platform != "linux" or not sandbox_module.probe().strict,
                                   reason="the python tool needs the code sandbox's full isolation (CI: root)")


@needs_sandbox
def test_python_state_persists_within_an_episode_not_across():
    make_env = get_env("python", timeout=2.0)
    episode, other = make_env(), make_env()
    assert episode.step("<python>x = 20\ndef double(v):\n    return 2 * v</python>") == ("<output></output>", None,
                                                                                          False)
    assert episode.step("<python>double(x) + 2</python>")[0] == "<output>42</output>"  # a REPL's last value
    assert episode.step("<python>print(x + 1)</python>")[0] == "<output>21</output>"
    assert episode.step("<python>y = 1/0</python>")[0] == "<output>error: ZeroDivisionError: division by zero</output>"
    assert episode.step("<python>x</python>")[0] == "<output>20</output>"  # the failed cell left no trace
    assert other.step("<python>print(x)</python>")[0] == \
        "<output>error: NameError: name 'x' is not defined</output>"  # another episode: nothing shared
    episode.close()
    other.close()


@needs_sandbox
def test_hanging_tool_program_is_stopped_and_reported():
    env = get_env("python", timeout=0.5)()
    start = time.monotonic()
    observation, reward, done = env.step("<python>while True:\n    pass</python>")
    assert observation == "<output>error: the program ran past 0.5 s and was stopped</output>"
    assert time.monotonic() - start < 10 and not done and env.tool_errors == 1
    assert env.step("<python>print('still here')</python>")[0] == "<output>still here</output>"
    assert sandbox_module.sandbox_processes() == []  # nothing left running
