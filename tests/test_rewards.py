"""Reward registry, contract checks, user files, RewardSet, and the format/length/language built-ins."""

import math
import subprocess
import sys
import textwrap

import pytest

from tether.rewards import (
    RewardContractError,
    RewardFunctionError,
    RewardSet,
    RewardSetupError,
    available_rewards,
    get_reward,
    register_reward,
)
from tether.rewards import base
from tether.rewards.length import overlong_penalty


def call(reward, completions, **columns):
    return reward(["p"] * len(completions), completions, **columns)


# ---------------------------------------------------------------------------------------------
# format


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>abc</think><answer>4</answer>", 1.0),
        ("  <think>\nabc\n</think>\n\n<answer> 4 </answer>\n ", 1.0),  # surrounding whitespace ignored
        ("<think></think><answer></answer>", 1.0),
        ("<think>abc</think> so <answer>4</answer>", 0.0),  # text between the blocks
        ("Sure! <think>abc</think><answer>4</answer>", 0.0),  # text before
        ("<think>abc</think><answer>4</answer> done", 0.0),  # text after
        ("<answer>4</answer><think>abc</think>", 0.0),  # wrong order
        ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0),  # a tag twice
        ("<think>a<think>b</think><answer>1</answer>", 0.0),
        ("<think>abc</think>", 0.0),
        ("", 0.0),
    ],
)
def test_format_strict(completion, expected):
    assert call(get_reward("format"), [completion]) == [expected]


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>abc</think><answer>4</answer>", 1.0),
        ("<think>abc</think><answer>4</answer> done", 0.75),  # 4 tags once, off-template: capped
        ("<think>abc</think> no answer", 0.5),
        ("<answer>4</answer>", 0.5),
        ("<think>a</think><answer>1</answer><answer>2</answer>", 0.5),  # answer tags twice: no credit
        ("plain text", 0.0),
    ],
)
def test_format_partial(completion, expected):
    assert call(get_reward("format", mode="partial"), [completion]) == [expected]


def test_format_custom_tags_and_think_in_prompt():
    reward = get_reward("format", think_tag="reasoning", answer_tag="final")
    completions = ["<reasoning>x</reasoning><final>1</final>", "<think>x</think><answer>1</answer>"]
    assert call(reward, completions) == [1.0, 0.0]
    in_prompt = get_reward("format", think_in_prompt=True)  # prompt ends with "<think>"
    assert call(in_prompt, ["abc</think><answer>4</answer>", "<think>abc</think><answer>4</answer>"]) == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# length


@pytest.mark.parametrize(
    "length, expected",
    [
        (0, 0.0),
        (15, 0.0),  # L = L_max - L_cache: last length without penalty
        (16, -0.2),  # (15 - 16) / 5
        (18, -0.6),  # (15 - 18) / 5
        (20, -1.0),  # L = L_max: (15 - 20) / 5, continuous with the -1 beyond
        (21, -1.0),
        (500, -1.0),
    ],
)
def test_dapo_overlong_boundaries(length, expected):
    """DAPO eq. 13 with L_max = 20, L_cache = 5."""
    assert overlong_penalty(length, max_length=20, cache=5) == pytest.approx(expected)
    reward = get_reward("length", mode="dapo_overlong", max_length=20, cache=5)
    assert call(reward, ["x"], completion_lengths=[length]) == [pytest.approx(expected)]


def test_length_token_sources():
    reward = get_reward("length", mode="dapo_overlong", max_length=20, cache=5)
    assert call(reward, ["", ""], completion_ids=[[1] * 15, [1] * 18]) == [0.0, pytest.approx(-0.6)]

    class WhitespaceTokenizer:
        def encode(self, text, add_special_tokens=False):
            return text.split()

    with_tokenizer = get_reward("length", mode="target", target=4, tokenizer=WhitespaceTokenizer())
    assert call(with_tokenizer, ["a b c d", "a b", "a b c d e f"]) == [0.0, -0.5, -0.5]


def test_length_target_in_chars():
    """-|L - 100| / 100."""
    reward = get_reward("length", mode="target", target=100, unit="chars")
    lengths = [100, 50, 150, 0, 300]
    assert call(reward, ["x" * n for n in lengths]) == [0.0, -0.5, -0.5, -1.0, -2.0]


def test_length_errors_say_what_is_missing():
    with pytest.raises(ValueError, match="needs max_length .* and cache"):
        get_reward("length", mode="dapo_overlong", max_length=20)
    with pytest.raises(ValueError, match="need 0 < cache <= max_length"):
        get_reward("length", max_length=20, cache=30)
    with pytest.raises(ValueError, match="needs target > 0"):
        get_reward("length", mode="target")
    reward = get_reward("length", mode="target", target=10)
    with pytest.raises(RewardSetupError, match="completion_lengths column.*tokenizer option.*unit: chars"):
        call(reward, ["abc"])


# ---------------------------------------------------------------------------------------------
# language


@pytest.mark.parametrize(
    "script, text, expected",
    [
        ("latin", "Hello world", 1.0),
        ("latin", "Hello 世界", 5 / 7),
        ("han", "Hello 世界", 2 / 7),
        ("zh", "你好, world!", 2 / 7),
        ("latin", "café naïve", 1.0),
        ("cyrillic", "Привет, world", 6 / 11),
        ("ja", "日本語のテキスト", 1.0),
        ("han", "日本語のテキスト", 3 / 8),
        ("cjk", "안녕 世界", 1.0),
        (["latin", "greek"], "abc αβγ", 1.0),
        ("latin", "123 + 4 = 127 !!", 0.0),  # no letters
        ("latin", "", 0.0),
    ],
)
def test_language_share(script, text, expected):
    assert call(get_reward("language", script=script), [text]) == [pytest.approx(expected)]


def test_language_unknown_script():
    with pytest.raises(ValueError, match="unknown script 'klingon'; choose from .*cyrillic"):
        get_reward("language", script="klingon")


# ---------------------------------------------------------------------------------------------
# lookup by name


def test_unknown_name_suggests_the_closest_and_the_file_form():
    with pytest.raises(ValueError) as error:
        get_reward("mth")
    message = str(error.value)
    assert "unknown reward 'mth'. Did you mean 'math'?" in message
    assert "path/to/file.py:function" in message
    assert "format" in message and "judge" in message


def test_unknown_option_names_the_option_and_the_valid_ones():
    with pytest.raises(ValueError) as error:
        get_reward("format", think="reasoning")
    assert str(error.value) == (
        "reward 'format' has no option 'think'. Did you mean 'think_tag'? "
        "Valid options: think_tag, answer_tag, mode, think_in_prompt, on_invalid."
    )


def test_every_builtin_is_registered_and_lazy():
    assert set(available_rewards()) >= {"math", "format", "length", "language", "code", "reward_model", "judge"}
    program = (
        "import sys; from tether.rewards import get_reward; get_reward('format'); "
        "heavy = [m for m in ('math_verify', 'torch', 'transformers', 'tether.rewards.code', "
        "'tether.rewards.judge', 'tether.rewards.reward_model', 'tether.rewards.math') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", program], check=True)


def test_register_reward_by_decorator(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    @register_reward("constant")
    def make_constant_reward(value: float = 1.0):
        def constant(prompts, completions, **columns):
            return [value] * len(completions)

        return constant

    assert call(get_reward("constant", value=0.25), ["a", "b"]) == [0.25, 0.25]
    register_reward("broken", "tether.rewards.no_such_module:make_it")
    with pytest.raises(ImportError, match="reward 'broken' could not be loaded from tether.rewards.no_such_mod"):
        get_reward("broken")


# ---------------------------------------------------------------------------------------------
# user functions from a file

USER_FILE = """
import pathlib
pathlib.Path(__file__).with_suffix(".imported").touch()  # proves when the file is imported

def exact_match(prompts, completions, answer, **columns):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]

def scaled(prompts, completions, scale=1.0, **columns):
    return [scale * len(c) for c in completions]

def strict_scaled(prompts, completions, scale=1.0):
    return [scale for c in completions]

def helper():
    pass
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent(USER_FILE))
    return path


def test_user_file_is_imported_only_when_named(user_file):
    marker = user_file.with_suffix(".imported")
    assert not marker.exists()
    reward = get_reward(f"{user_file}:exact_match")
    assert marker.exists()
    assert reward.__name__ == "exact_match"
    assert call(reward, ["42", " 7 "], answer=["42", "8"]) == [1.0, 0.0]


def test_user_file_relative_to_cwd_with_options(user_file, monkeypatch):
    monkeypatch.chdir(user_file.parent)
    assert call(get_reward("my_rewards.py:scaled", scale=0.5), ["abcd"]) == [2.0]
    with pytest.raises(ValueError, match="has no option 'scal'. Did you mean 'scale'"):
        get_reward("my_rewards.py:strict_scaled", scal=2)


def test_user_module_form(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    assert call(get_reward("my_rewards:scaled"), ["abc"]) == [3.0]


def test_user_file_errors(user_file, tmp_path):
    with pytest.raises(ValueError) as error:
        get_reward(f"{user_file}:exact_mach")
    assert str(error.value) == (
        f"reward file '{user_file}' has no function 'exact_mach'. Did you mean 'exact_match'? "
        "Functions defined there: exact_match, helper, scaled, strict_scaled."
    )
    missing = tmp_path / "nope.py"
    with pytest.raises(ValueError, match=r"reward file '.*nope.py' not found"):
        get_reward(f"{missing}:f")
    broken = tmp_path / "broken.py"
    broken.write_text("1 / 0\n")
    with pytest.raises(ValueError, match=r"importing reward file '.*broken.py' failed: ZeroDivisionError"):
        get_reward(f"{broken}:f")


# ---------------------------------------------------------------------------------------------
# contract checks


def returning(values):
    def fixed(prompts, completions, **columns):
        return values

    return fixed


def test_wrong_length_names_the_function():
    with pytest.raises(RewardContractError) as error:
        call(get_reward(returning([1.0])), ["a", "b"])
    assert str(error.value) == (
        "reward 'fixed' returned 1 values for 2 completions (first unmatched index: 1); "
        "return exactly one value per completion"
    )


@pytest.mark.parametrize(
    "bad, index, shown",
    [
        ([1.0, math.nan], 1, "nan (not finite)"),
        ([math.inf, 0.0], 0, "inf (not finite)"),
        ([0.0, "abc"], 1, "'abc' (str is not a number)"),
        ([[1.0], 0.0], 0, "[1.0] (list is not a number)"),
    ],
)
def test_invalid_values_name_function_and_index(bad, index, shown):
    with pytest.raises(RewardContractError) as error:
        call(get_reward(returning(bad)), ["a", "b"])
    assert str(error.value).startswith(f"reward 'fixed' returned an invalid value at index {index}: {shown}.")
    assert "on_invalid: none" in str(error.value)


def test_on_invalid_none_counts_instead_of_raising():
    reward = get_reward(returning([math.nan, "x", 0.5]), on_invalid="none")
    assert call(reward, ["a", "b", "c"]) == [None, None, 0.5]
    assert reward.stats["invalid"] == 2
    with pytest.raises(RewardContractError, match="returned 1 values for 3"):  # length is never fixed up
        call(get_reward(returning([0.5]), on_invalid="none"), ["a", "b", "c"])


def test_accepted_value_types():
    """bool reads as 1.0/0.0 (the `[a == b for ...]` idiom), numpy and 0-d torch scalars as floats."""
    import numpy as np
    import torch

    values = [True, False, 3, np.float32(0.5), torch.tensor(0.25), None]
    assert call(get_reward(returning(values)), list("abcdef")) == [1.0, 0.0, 3.0, 0.5, 0.25, None]
    with pytest.raises(RewardContractError, match="returned float; expected a list of 1 values"):
        call(get_reward(returning(1.0)), ["a"])


def test_raising_function_names_the_row():
    def flaky(prompts, completions, **columns):
        return [1.0 / len(c) for c in completions]

    with pytest.raises(RewardFunctionError) as error:
        call(get_reward(flaky), ["ab", "abc", "", "d"])
    assert str(error.value) == "reward 'flaky' raised on row 2: ZeroDivisionError: float division by zero"


def test_raising_only_on_the_whole_batch():
    def batch_only(prompts, completions, **columns):
        if len(completions) > 1:
            raise RuntimeError("batch too big")
        return [0.0]

    with pytest.raises(RewardFunctionError) as error:
        call(get_reward(batch_only), ["a", "b"])
    assert str(error.value) == (
        "reward 'batch_only' raised on the batch of 2 (no single row raises alone): RuntimeError: batch too big"
    )


def test_misaligned_columns_are_rejected():
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        call(get_reward(returning([0.0, 0.0])), ["a", "b"], answer=["x"])


# ---------------------------------------------------------------------------------------------
# RewardSet


def test_reward_set_weighted_total_and_none():
    """total = 2 * f1 - 1 * f2 per row; a None in a weighted component makes the total None."""
    def f1(prompts, completions, **columns):
        return [1.0, 0.0, None]

    def f2(prompts, completions, **columns):
        return [0.5, 0.5, 0.5]

    rewards = RewardSet([{"name": f1, "weight": 2.0}, {"name": f2, "weight": -1.0}])
    result = rewards(["p"] * 3, ["a", "b", "c"])
    assert result.total == [1.5, -0.5, None]
    assert result.per_function == {"f1": [1.0, 0.0, None], "f2": [0.5, 0.5, 0.5]}
    assert result.none_count == {"f1": 1, "f2": 0}
    metrics = result.metrics()
    # f1 over its two non-None values {1, 0}: mean 0.5, population std 0.5; total over {1.5, -0.5}.
    assert metrics["rewards/f1/mean"] == 0.5 and metrics["rewards/f1/std"] == 0.5
    assert metrics["rewards/f1/none_count"] == 1.0
    assert metrics["rewards/total/mean"] == 0.5 and metrics["rewards/total/std"] == 1.0
    assert metrics["rewards/f2/std"] == 0.0


def test_reward_set_from_config_list():
    rewards = RewardSet(
        [
            {"name": "format", "weight": 1.0},
            {"name": "format", "weight": 0.5, "mode": "partial"},
            {"name": "length", "weight": 0.0, "mode": "target", "target": 4, "unit": "chars"},
            "language",
        ]
    )
    assert rewards.names == ["format", "format_2", "length", "language"]
    result = rewards(["p", "p"], ["<think>é</think><answer>b</answer>", "<think>x</think>"])
    # row 0: 1 + 0.5 * 1 + 0 * length + 1 * (all letters latin) ; row 1: 0 + 0.5 * 0.5 + 1
    assert result.total == [2.5, 1.25]
    assert result.weights["length"] == 0.0


def test_zero_weight_none_does_not_void_the_total():
    def never(prompts, completions, **columns):
        return [None] * len(completions)

    result = RewardSet([{"name": "format"}, {"name": never, "weight": 0}])(["p"], ["x"])
    assert result.total == [0.0]
    assert result.none_count["never"] == 1
    assert math.isnan(result.metrics()["rewards/never/mean"])


def test_reward_set_config_errors():
    with pytest.raises(ValueError, match=r"rewards\[1\] has no 'name'"):
        RewardSet([{"name": "format"}, {"weight": 1.0}])
    with pytest.raises(ValueError, match=r"rewards\[0\] \(format\): weight must be a finite number, got 'high'"):
        RewardSet([{"name": "format", "weight": "high"}])
    with pytest.raises(ValueError, match="unknown reward 'fromat'. Did you mean 'format'"):
        RewardSet([{"name": "fromat"}])


def test_check_rows_of_a_user_function_runs_through_the_reward_set(tmp_path):
    """A function's `check_rows` attribute survives the contract wrapper (and options, a partial) and
    RewardSet.check_rows runs it with the file name and the rows' own indices."""
    from tether.data.loading import DataError

    (tmp_path / "mine.py").write_text(textwrap.dedent("""
        from tether.data.loading import DataError

        def exact(prompts, completions, answer, scale=1.0, **columns):
            return [scale * float(c == a) for c, a in zip(completions, answer)]

        def check_rows(source, rows):
            for row, columns in rows:
                if not isinstance(columns.get("answer"), str):
                    raise DataError(source, "expected a string answer", row, "answer")

        exact.check_rows = check_rows
    """))
    reward_set = RewardSet([{"name": f"{tmp_path}/mine.py:exact", "scale": 2.0}, "format"])
    reward_set.check_rows("d.jsonl", [(0, {"answer": "4"}), (1, {"answer": "5"})])  # good rows pass
    with pytest.raises(DataError, match=r"d\.jsonl, row 7, field 'answer': expected a string answer"):
        reward_set.check_rows("d.jsonl", [(0, {"answer": "4"}), (7, {"answer": 4})])
    assert reward_set(["p"], ["4"], answer=["4"]).per_function["exact"] == [2.0]


def test_concatenated_results_of_two_batches_equal_scoring_them_together():
    from tether.rewards import RewardResult

    def maybe(prompts, completions, **columns):
        return [None if c == "?" else float(len(c)) for c in completions]

    def size(prompts, completions, **columns):
        return [1.0] * len(completions)

    reward_set = RewardSet([{"name": maybe, "weight": 2.0}, {"name": size, "weight": 0.0}])
    prompts, completions = ["p"] * 5, ["ab", "?", "abc", "?", "a"]
    whole = reward_set(prompts, completions)
    parts = RewardResult.concat([reward_set(prompts[:2], completions[:2]), reward_set(prompts[2:], completions[2:])])
    assert (parts.total, parts.per_function, parts.none_count) == (whole.total, whole.per_function, whole.none_count)
    assert parts.total == [4.0, None, 6.0, None, 2.0] and parts.none_count["maybe"] == 2
