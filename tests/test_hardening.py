"""Issue 19's hardening: a hung reward stops the run (naming function, step and limit) instead of stalling it;
a raising reward is one line plus the user's own frames, exit 2; a reward needing a column the data lacks is
refused at load; a refused run leaves the earlier run's config.yaml as it was."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tether import cli
from tether.config import ConfigError, load_config
from tether.data.loading import DataError
from tether.recipes import sft
from tether.rewards import RewardFunctionError, RewardSet, RewardTimeoutError

REPO = Path(__file__).resolve().parents[1]
TINY = "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=1"

USER_REWARDS = textwrap.dedent('''
    import time

    calls = []


    def hangs_on_second_call(prompts, completions, **columns):
        calls.append(1)
        while len(calls) >= 2:
            time.sleep(1)
        return [0.5] * len(completions)


    def slow(prompts, completions, **columns):
        time.sleep(0.3)
        return [1.0] * len(completions)


    def raises(prompts, completions, **columns):
        return [helper(c) for c in completions]


    def always_raises(prompts, completions, **columns):
        return [helper('bad') for c in completions]


    def helper(completion):
        if completion == "bad":
            raise ValueError("cannot score " + completion)
        return 1.0


    def needs_solution(prompts, completions, solution, **columns):
        return [float(c == s) for c, s in zip(completions, solution)]
''')


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "rw.py"
    path.write_text(USER_REWARDS)
    return path


# ----------------------------------------------------------------------------- item 1: a wall-clock limit


def test_a_hung_reward_stops_at_its_time_limit_naming_function_and_step(rewards_file, caplog):
    rewards = RewardSet([{"name": f"{rewards_file}:hangs_on_second_call", "time_limit_s": 0.4}])
    assert rewards(["p"], ["c"]).total == [0.5]  # first call returns
    rewards.step = 7
    start = time.monotonic()
    with caplog.at_level("INFO", logger="tether"), pytest.raises(RewardTimeoutError) as error:
        rewards(["p"], ["c"])
    assert 0.4 <= time.monotonic() - start < 2.0
    assert str(error.value).startswith(
        "reward 'hangs_on_second_call' did not return within its time limit of 0.4 s at step 7;")
    # while it waited, the log said which stage the step was in
    assert "scoring at step 7: waiting on reward 'hangs_on_second_call'" in caplog.text


def test_a_slow_reward_within_its_limit_and_the_default_limit(rewards_file):
    rewards = RewardSet([f"{rewards_file}:slow", {"name": "format", "weight": 0.0}])
    assert rewards.time_limits == {"slow": 300.0, "format": 300.0}  # the default: 300 s per batch
    assert RewardSet([{"name": f"{rewards_file}:slow", "time_limit_s": 5}])(["p"], ["c"]).total == [1.0]
    for bad in (0, -1, float("inf"), "10", True):
        with pytest.raises(ValueError, match="time_limit_s must be a positive number of seconds"):
            RewardSet([{"name": "format", "time_limit_s": bad}])


@pytest.mark.slow
def test_tether_grpo_with_a_hung_reward_exits_with_one_line_and_keeps_the_checkpoint(rewards_file, tmp_path):
    """The reported case, from the command line: before, `tether grpo` sat at "train 0/3" forever."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("ab", "abc", "a", "b")))
    result = subprocess.run(
        [sys.executable, "-m", "tether", "grpo", f"data={data}", f"model={TINY}", f"output_dir={tmp_path / 'run'}",
         f"rewards=[{{name: '{rewards_file}:hangs_on_second_call', time_limit_s: 2}}]", "report_to=[]",
         "progress=false", "batch_size=2", "group_size=2", "max_completion_length=4", "max_steps=3", "save_steps=1"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env=_env())
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tether grpo: reward 'hangs_on_second_call' did not return within its time limit of 2 s "
                           "at step 2; the run stops here"), last
    assert "Traceback" not in result.stderr
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-1"]


# ----------------------------------------------------------------------------- item 8: a raising reward


def test_a_raising_reward_names_the_row_and_the_users_own_frames(rewards_file):
    rewards = RewardSet([f"{rewards_file}:raises"])
    with pytest.raises(RewardFunctionError) as error:
        rewards(["p", "p", "p"], ["ok", "bad", "ok"])
    assert str(error.value) == "reward 'raises' raised on row 1: ValueError: cannot score bad"
    lines = USER_REWARDS.splitlines()
    line_of = lambda text: next(i for i, line in enumerate(lines, 1) if text in line)  # noqa: E731
    assert error.value.frames[0] == (f"{rewards_file}:{line_of('return [helper(c)')} in raises: "
                                     "return [helper(c) for c in completions]")
    assert error.value.frames[-1] == (f"{rewards_file}:{line_of('raise ValueError')} in helper: "
                                      'raise ValueError("cannot score " + completion)')
    assert not any("tether" in Path(frame.split(":")[0]).parts for frame in error.value.frames)


def _grpo(data, output_dir, reward):
    return ["grpo", f"data={data}", f"model={TINY}", f"output_dir={output_dir}", f"rewards=[{{name: '{reward}'}}]",
            "report_to=[]", "progress=false", "batch_size=2", "group_size=2", "max_completion_length=4",
            "max_steps=1"]


def test_tether_grpo_prints_a_raising_reward_as_one_line_and_frames_exit_2(rewards_file, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("ab", "abc")))
    code = cli.main(_grpo(data, tmp_path / "run", f"{rewards_file}:always_raises"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("tether", "  at"))]
    assert code == 2
    assert err[0] == "tether grpo: reward 'always_raises' raised on row 0: ValueError: cannot score bad"
    lines = USER_REWARDS.splitlines()
    own = [line for line in err[1:] if "<listcomp>" not in line]  # Python < 3.12 adds the comprehension's frame
    assert own == [f"  at {rewards_file}:{lines.index(text) + 1} in {function}: {text.strip()}"
                   for function, text in (("always_raises", "    return [helper('bad') for c in completions]"),
                                          ("helper", '        raise ValueError("cannot score " + completion)'))]


def test_tether_grpo_refuses_a_reward_needing_a_missing_column_before_training(rewards_file, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in ("ab", "abc")))
    code = cli.main(_grpo(data, tmp_path / "run", f"{rewards_file}:needs_solution"))
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"tether grpo: DataError: {data}, row 0, field 'solution': reward 'needs_solution' needs the column "
        "'solution', which this row lacks. Columns in the data: answer, completion_ids, completion_lengths. "
        "Add the column, or give the parameter a default (rows count from 0)")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_reward_needing_a_column_the_data_lacks_is_refused_at_load(rewards_file):
    rewards = RewardSet([f"{rewards_file}:needs_solution"])
    rewards.check_rows("d.jsonl", [(0, {"solution": "a"}), (1, {"solution": "b"})])  # present: fine
    with pytest.raises(DataError) as error:
        rewards.check_rows("d.jsonl", [(0, {"answer": "a", "level": 1})])
    assert str(error.value) == (
        "d.jsonl, row 0, field 'solution': reward 'needs_solution' needs the column 'solution', which this row "
        "lacks. Columns in the data: answer, completion_ids, completion_lengths, level. Add the column, or give "
        "the parameter a default (rows count from 0)")
    # a column given as an option, or a parameter with a default, is not needed from the data
    RewardSet([{"name": f"{rewards_file}:needs_solution", "solution": ["x"]}]).check_rows("d.jsonl", [(0, {})])


# ----------------------------------------------------------------------------- item 7: config.yaml of a refused run


def _sft_config(data, output_dir, *overrides):
    return load_config(sft.SFTConfig, None, [
        f"data={data}", f"model={TINY}", f"output_dir={output_dir}", "report_to=[]", "progress=false",
        "max_steps=1", "save_steps=1", "batch_size=2", *overrides])


def test_a_refused_run_leaves_the_earlier_runs_config_yaml_unchanged(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}:", "completion": str(i)}) + "\n" for i in range(4)))
    sft.train(_sft_config(data, tmp_path / "run", "learning_rate=1e-3"))
    before = (tmp_path / "run" / "config.yaml").read_bytes()
    assert b"learning_rate: 0.001" in before
    with pytest.raises(ConfigError, match="holds a checkpoint of an earlier run"):  # refused: not resume=true
        sft.train(_sft_config(data, tmp_path / "run", "learning_rate=5e-2"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    with pytest.raises(DataError):  # failed at data load
        sft.train(_sft_config(bad, tmp_path / "run", "learning_rate=5e-2", "resume=true"))
    assert (tmp_path / "run" / "config.yaml").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == []  # no temp file left


def _env():
    import os

    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- item 10: data errors


def test_an_overlong_line_is_refused_before_tokenizing(tmp_path):
    """A 1 MB completion against max_length=64: refused on its character count (a token of the tiny tokenizer
    covers at most 12 characters, so 64 tokens hold at most 768), without tokenizing it (it took ~9 s, 10 MB
    88 s); overlong=drop drops it the same way. A row just under the bound is still tokenized and judged."""
    from tether.data.sft import build_sft_examples, max_token_characters
    from tether.models import tiny_tokenizer

    tok = tiny_tokenizer()
    assert max_token_characters(tok) == 12
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "q", "completion": "x" * 1_000_000}]
    start = time.perf_counter()
    with pytest.raises(DataError) as error:
        build_sft_examples(rows, tok, source="d.jsonl", max_length=64)
    assert time.perf_counter() - start < 5.0
    assert str(error.value) == ("d.jsonl, row 1: 1,000,001 non-space characters, more than max_length=64 tokens can "
                                "hold (refused before tokenizing); raise max_length or set overlong=truncate or "
                                "overlong=drop (rows count from 0)")
    examples, stats = build_sft_examples(rows, tok, source="d.jsonl", max_length=64, overlong="drop")
    assert [e.row for e in examples] == [0] and stats.dropped_rows == [1]
    spaced = [{"prompt": "q", "completion": " x" * 700}]  # 701 non-space characters: not surely too long...
    with pytest.raises(DataError, match=r"row 0: \d+ tokens > max_length=64"):  # ...so tokenized, then refused
        build_sft_examples(spaced, tok, source="d.jsonl", max_length=64)


def test_a_null_field_says_null_not_missing(tmp_path):
    from tether.data.preference import parse_preference_row, parse_unpaired_row
    from tether.data.sft import build_sft_examples
    from tether.models import tiny_tokenizer

    tok = tiny_tokenizer()
    with pytest.raises(DataError, match=r"^d.jsonl, row 0, field 'completion': is null; the prompt/completion"):
        build_sft_examples([{"prompt": "a", "completion": None}], tok, source="d.jsonl", max_length=64)
    with pytest.raises(DataError, match=r"^d.jsonl, row 0, field 'completion': missing field"):
        build_sft_examples([{"prompt": "a"}], tok, source="d.jsonl", max_length=64)
    with pytest.raises(DataError, match=r"^d.jsonl, row 3, field 'rejected': is null; preference rows need"):
        parse_preference_row({"prompt": "p", "chosen": "a", "rejected": None}, "d.jsonl", 3)
    with pytest.raises(DataError, match=r"^d.jsonl, row 2, field 'label': is null; unpaired"):
        parse_unpaired_row({"prompt": "p", "completion": "a", "label": None}, "d.jsonl", 2)


def test_a_non_utf8_file_names_the_line_and_the_byte(tmp_path):
    from tether.data.loading import load_rows

    for suffix in (".jsonl", ".json"):
        path = tmp_path / f"d{suffix}"
        path.write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "caf\xe9"}\n')
        with pytest.raises(DataError) as error:
            load_rows(str(path))
        assert str(error.value) == f"{path}: not UTF-8 text (line 3, byte 41 of the file); re-save the file as UTF-8"


def test_row_errors_say_rows_count_from_0():
    assert str(DataError("d.jsonl", "empty string", 5, "text")) == \
        "d.jsonl, row 5, field 'text': empty string (rows count from 0)"
    assert str(DataError("d.jsonl", "file not found")) == "d.jsonl: file not found"


# ----------------------------------------------------------------------------- items 13 and 14: the tools' options


def test_tools_take_key_value_as_well_as_flags():
    import argparse

    from tether.cli import _split
    from tether.runtime.options import key_value_as_flags

    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir")
    parser.add_argument("--prompt")
    parser.add_argument("--skip-bad-rows", action="store_true")
    argv = ["rlvr", "output_dir=X", "--prompt", "a=b", "--skip-bad-rows", "seed=3"]
    assert key_value_as_flags(parser, argv) == ["rlvr", "--output-dir=X", "--prompt", "a=b", "--skip-bad-rows",
                                                "seed=3"]  # a value stays a value; an unknown key is left to argparse
    # the recipes: key=value, --key=value and --key value, dashes read as underscores
    assert _split(["output_dir=A", "--max-steps=3", "--output-dir", "B", "--config", "c.yaml"]) == \
        ("c.yaml", ["output_dir=A", "max_steps=3", "output_dir=B"], False)


def test_eval_rm_writes_beside_the_model_and_labels_both_orderings(tmp_path, capsys, monkeypatch):
    from tether.eval.reward_model import main as eval_rm_main
    from tether.models import load, save
    from tether.models.value import from_causal_lm

    model, tokenizer = load(TINY)
    folder = tmp_path / "rm" / "final"
    save(from_causal_lm(model, pad_token_id=tokenizer.pad_token_id), tokenizer, folder)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}", "chosen": "yes" * (i + 1), "rejected": "no"}) + "\n"
                            for i in range(5)))
    monkeypatch.chdir(tmp_path)
    assert eval_rm_main([f"model={folder}", f"data={data}", "bins=2", "device=cpu"]) == 0  # key=value (item 13)
    assert not (tmp_path / "eval_rm.json").exists()  # not the current folder
    report = json.loads((folder / "eval_rm.json").read_text())
    assert report["num_pairs"] == 5 and sum(row["count"] for row in report["calibration"]) == 10
    out = capsys.readouterr().out
    assert "pairs 5 " in out and "calibration: each pair in both orders (10 orderings of 5 pairs)" in out


# ----------------------------------------------------------------------------- item 15: our deprecated calls


def test_sampling_scoring_and_lora_raise_no_deprecation_warning_from_our_calls(tmp_path):
    """`past_key_values` (transformers 5.25 calls it `cache`) in the sampler and the shared-prompt forward, and
    PEFT's read of `is_gradient_checkpointing` when LoRA is added: run as errors, none may fire."""
    import warnings

    import torch

    from tether.models import LoraConfig, add_lora, load
    from tether.models.shared_prompt import completion_states
    from tether.rollout import SamplingParams, get_sampler

    model, tokenizer = load(TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        batch = get_sampler("builtin", model, tokenizer).generate(
            [tokenizer("ab")["input_ids"]], SamplingParams(n=2, max_new_tokens=4, seed=0)).to_tensors(
            tokenizer.pad_token_id)
        with torch.no_grad():
            completion_states(model, batch)
        add_lora(model, LoraConfig(r=4))


def test_a_bad_time_limit_is_a_config_error_exit_2(tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "ab"}) + "\n")
    argv = _grpo(data, tmp_path / "run", "format")[:-1] + ["max_steps=1"]
    argv[5] = "rewards=[{name: format, time_limit_s: 0}]"
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tether grpo: config error: config key 'rewards': rewards[0] (format): time_limit_s must be a positive "
        "number of seconds, got 0")


# ----------------------------------------------------------------------------- item 16: plots say what they show


def test_every_plot_has_a_y_axis_label(tmp_path, monkeypatch):
    import matplotlib.figure

    from tether.demo.report import plot_series

    with pytest.raises(TypeError, match="ylabel"):
        plot_series(tmp_path / "a.png", "t", {"a": ([1, 2], [3, 4])})
    labels = []
    original = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: (labels.append(self.axes[0].get_ylabel()), original(self, *a, **k)))
    assert plot_series(tmp_path / "b.png", "t", {"a": ([1, 2], [3, 4])}, ylabel="mean reward").is_file()
    assert labels == ["mean reward"]
