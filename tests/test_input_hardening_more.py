"""Property-based input hardening of the preference loader (DPO/KTO/RM) and the RL prompt loader (GRPO/PPO):
whatever rows arrive, loading either succeeds with examples that respect the limits or raises a DataError
naming the file and row (and the field where one is at fault), never an internal traceback. Prompts longer
than max_prompt_length are dropped, truncated or rejected at load time as `overlong` says, counted in the
log, and never reach the sampler."""

import json
import logging
import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tether.config import load_config
from tether.data.loading import DataError
from tether.data.preference import build_preference_pairs, build_unpaired_examples
from tether.data.sft import build_sft_examples
from tether.models.tiny import tiny_tokenizer
from tether import online
from tether.recipes import grpo
from tether.rollout.prompts import load_prompts

TOKENIZER = tiny_tokenizer()
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MODEL = "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=2"
SOURCE = "f.jsonl"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
roles = st.sampled_from(["system", "user", "assistant", "tool", "bot"]) | st.none() | st.integers()
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": st.text(max_size=12) | st.none() | st.integers()})
                    | st.dictionaries(st.sampled_from(["role", "content", "name"]), json_values, max_size=3),
                    max_size=4)
well_formed = st.lists(st.tuples(st.sampled_from(["system", "user", "assistant", "tool"]), st.text(max_size=8)),
                       min_size=1, max_size=4).map(lambda turns: [{"role": r, "content": c} for r, c in turns])
hh_text = st.builds(lambda a, b: f"\n\nHuman: {a}\n\nAssistant: {b}", st.text(max_size=10), st.text(max_size=10))
texts = st.text(max_size=30) | hh_text | st.sampled_from(["", "   ", "\n\nAssistant:", "yes", "no"])
field_values = texts | well_formed | messages | json_values


def preference_rows():
    keys = st.sampled_from(["prompt", "chosen", "rejected", "completion", "label", "margin", "other"])
    return st.dictionaries(keys, field_values | st.booleans(), max_size=5)


def check_data_error(err: DataError, n_rows: int, fields: tuple[str, ...]) -> None:
    """The error names this file; a row-level one names a real row and (if any) a field of that row."""
    assert str(err).startswith(SOURCE) and err.source == SOURCE
    if err.row is not None:
        assert 0 <= err.row < n_rows and str(err).startswith(f"{SOURCE}, row {err.row}")
    if err.field is not None:
        assert err.row is not None and re.match(rf"^(prompt\+)?({'|'.join(fields)})\b", err.field), err.field


# ----------------------------------------------------------------------------- preference rows


@SETTINGS
@given(st.lists(preference_rows(), min_size=1, max_size=4), st.sampled_from(["error", "truncate", "drop"]),
       st.sampled_from(["auto", "always", "never"]))
def test_arbitrary_preference_rows_load_or_name_row_and_field(rows, overlong, chat_template):
    try:
        pairs, stats = build_preference_pairs(rows, TOKENIZER, source=SOURCE, max_length=24, overlong=overlong,
                                              chat_template=chat_template)
    except DataError as err:
        check_data_error(err, len(rows), ("prompt", "chosen", "rejected", "margin"))
    else:
        assert stats.kept == len(pairs) and stats.kept + stats.dropped == len(rows)
        for pair in pairs:
            assert pair.chosen_ids and pair.rejected_ids and pair.chosen_ids != pair.rejected_ids
            assert len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids)) <= 24
            assert 0 <= pair.row < len(rows)


@SETTINGS
@given(st.lists(preference_rows(), min_size=1, max_size=4))
def test_skip_bad_rows_counts_every_row(rows):
    """With skip_bad_rows every row is kept, skipped or dropped, and counted; only an empty result raises."""
    try:
        pairs, stats = build_preference_pairs(rows, TOKENIZER, source=SOURCE, max_length=24, overlong="drop",
                                              skip_bad_rows=True)
    except DataError as err:
        assert err.row is None and "no usable rows" in str(err)
    else:
        assert stats.kept + stats.skipped + stats.dropped == len(rows) == stats.total
        assert len(stats.skipped_rows) == stats.skipped and len(pairs) == stats.kept


@SETTINGS
@given(st.lists(preference_rows(), min_size=1, max_size=4), st.sampled_from(["error", "truncate", "drop"]))
def test_arbitrary_unpaired_rows_load_or_name_row_and_field(rows, overlong):
    try:
        examples, stats = build_unpaired_examples(rows, TOKENIZER, source=SOURCE, max_length=24, overlong=overlong)
    except DataError as err:
        check_data_error(err, len(rows), ("prompt", "chosen", "rejected", "completion", "label"))
    else:
        assert all(e.completion_ids and len(e.prompt_ids) + len(e.completion_ids) <= 24 for e in examples)
        assert all(isinstance(e.label, bool) and 0 <= e.row < len(rows) for e in examples)


@pytest.mark.parametrize("prompt, field, message", [
    ([[1]], "prompt[0]", "expected a {role, content} object"),
    ([], "prompt", "non-empty list"),
    ([{"role": "user"}], "prompt[0].content", "content must be a string"),
    ([{"role": "assistant", "content": "hi"}], "prompt[0].role", "expected a user turn"),
    ([{"role": "user", "content": "hi"}], "prompt", "chat_template=never"),
])
@pytest.mark.parametrize("loader", ["preference", "unpaired", "sft"])
def test_message_list_prompt_before_a_string_completion_is_checked(loader, prompt, field, message):
    """Found by the properties above: a message-list prompt with string completions went to the chat template
    unchecked (AttributeError / jinja UndefinedError / ValueError from transformers); now a DataError."""
    row = {"prompt": prompt, "chosen": "a", "rejected": "b"} if loader == "preference" else \
        {"prompt": prompt, "completion": "a", "label": True}
    build = {"preference": build_preference_pairs, "unpaired": build_unpaired_examples, "sft": build_sft_examples}
    with pytest.raises(DataError, match=rf"^f.jsonl, row 1, field '{re.escape(field)}': .*{re.escape(message)}"):
        build[loader]([{"prompt": "ok", "chosen": "a", "rejected": "b", "completion": "a", "label": True}, row],
                      TOKENIZER, source=SOURCE, max_length=64, chat_template="never" if "never" in message else "auto")


# ----------------------------------------------------------------------------- RL prompts


prompt_rows = (st.dictionaries(st.sampled_from(["prompt", "answer", "tests", "x"]), field_values, max_size=3)
               | json_values)  # a line may hold any JSON value, not only an object


@SETTINGS
@given(st.lists(prompt_rows, min_size=1, max_size=5), st.sampled_from(["error", "truncate", "drop"]),
       st.sampled_from(["auto", "always", "never"]))
def test_arbitrary_prompt_lines_load_or_name_row_and_field(tmp_path, lines, overlong, chat_template):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    try:
        prompts = load_prompts(str(path), TOKENIZER, max_prompt_length=12, overlong=overlong,
                               chat_template=chat_template)
    except DataError as err:
        assert str(err).startswith(str(path)), err
        if err.row is not None:
            assert 0 <= err.row < len(lines)
        if err.field is not None:
            assert err.field.startswith("prompt"), err
    else:
        assert prompts and all(0 < len(p.ids) <= 12 for p in prompts)
        assert all(isinstance(lines[p.row], dict) and p.prompt == lines[p.row]["prompt"] for p in prompts)
        assert "prompt" not in prompts[0].columns


def test_message_list_prompt_with_chat_template_never_names_the_row(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(DataError, match=r"prompts.jsonl, row 1, field 'prompt': .*chat_template=never"):
        load_prompts(str(path), TOKENIZER, max_prompt_length=32, chat_template="never")


@SETTINGS
@given(st.lists(st.integers(1, 20), min_size=1, max_size=8), st.sampled_from(["truncate", "drop"]))
def test_overlong_prompts_are_handled_at_load_time_and_counted(tmp_path, lengths, overlong):
    """Prompts of the given lengths in characters (the tiny tokenizer: one token each) against
    max_prompt_length=10: drop keeps exactly the short ones, truncate keeps all, cut to their last 10 tokens;
    the warning counts what happened; error names the first long row."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": "a" * n, "answer": n}) + "\n" for n in lengths))
    long_rows = [i for i, n in enumerate(lengths) if len(TOKENIZER("a" * n)["input_ids"]) > 10]
    logger = logging.getLogger("tether")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        if overlong == "drop" and len(long_rows) == len(lengths):
            with pytest.raises(DataError, match="every prompt was dropped"):
                load_prompts(str(path), TOKENIZER, max_prompt_length=10, overlong=overlong)
            return
        prompts = load_prompts(str(path), TOKENIZER, max_prompt_length=10, overlong=overlong)
    finally:
        logger.removeHandler(handler)
    assert all(len(p.ids) <= 10 for p in prompts)
    kept = [i for i in range(len(lengths)) if overlong == "truncate" or i not in long_rows]
    assert [p.row for p in prompts] == kept
    warned = " ".join(r.getMessage() for r in records)
    if long_rows:
        count = "0 truncated" if overlong == "drop" else f"{len(long_rows)} truncated"
        dropped = f"{len(long_rows)} dropped" if overlong == "drop" else "0 dropped"
        assert count in warned and dropped in warned, warned
    else:
        assert "truncated" not in warned
    if long_rows:
        with pytest.raises(DataError, match=rf"row {long_rows[0]}, field 'prompt': .*> max_prompt_length=10"):
            load_prompts(str(path), TOKENIZER, max_prompt_length=10, overlong="error")


@pytest.mark.parametrize("overlong", ["drop", "truncate"])
def test_overlong_prompts_never_reach_the_sampler_in_a_run(tmp_path, monkeypatch, overlong):
    """A GRPO run over prompts of 1..29 tokens with max_prompt_length=8: every prompt the sampler is handed
    has <= 8 tokens: one of the short rows (drop), or a short row or the last 8 tokens of a long one
    (truncate)."""
    lengths = (1, 29, 3, 12, 5, 7, 20)
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": "b" * n}) + "\n" for n in lengths))
    reward = tmp_path / "reward.py"
    reward.write_text("def ones(prompts, completions, **columns):\n    return [1.0] * len(completions)\n")
    seen = []
    real_build = online.build_sampler

    def spying_build(config, model, tokenizer):
        sampler = real_build(config, model, tokenizer)
        real_generate = sampler.generate

        def generate(prompts, params):
            seen.extend(list(p) for p in prompts)
            return real_generate(prompts, params)

        sampler.generate = generate
        return sampler

    monkeypatch.setattr(online, "build_sampler", spying_build)
    config = load_config(grpo.GRPOConfig, None, [
        f"data={path}", f"model={MODEL}", f"rewards=[{{name: '{reward}:ones'}}]", f"output_dir={tmp_path / 'run'}",
        "report_to=[]", "progress=false", "batch_size=2", "group_size=2", "max_steps=3", "max_prompt_length=8",
        "max_completion_length=4", "max_length=16", f"overlong={overlong}", "kl_coef=0"])
    grpo.train(config)
    ids = [TOKENIZER("b" * n)["input_ids"] for n in lengths]
    allowed = {tuple(i) for i in ids if len(i) <= 8}
    if overlong == "truncate":
        allowed |= {tuple(i[-8:]) for i in ids}
    assert len(seen) == 3 * 2 and all(len(p) <= 8 and tuple(p) in allowed for p in seen)


@pytest.mark.parametrize("command", ["grpo", "best-of-n"])
def test_a_malformed_tests_row_fails_when_the_data_is_loaded(tmp_path, monkeypatch, command):
    """The file, row and field are named before any sampling (not at the first step that draws the row)."""
    from tether.recipes import best_of_n, grpo
    from tether.rewards.code import CodeTestsError
    from tether.rollout import sampler

    data = tmp_path / "code.jsonl"
    rows = [{"prompt": "add:", "tests": [{"input": "1 2\n", "output": "3\n"}]},
            {"prompt": "echo:", "tests": [{"input": "1", "output": "1"}]},
            {"prompt": "sub:", "tests": [{"input": "3 1"}]}]  # row 2: a case with no expected output
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the data was checked")

    monkeypatch.setattr(sampler.BuiltinSampler, "generate", no_sampling)
    model = "tiny:hidden_size=32,intermediate_size=64,num_hidden_layers=1"
    reward_spec = [{"name": "code", "allow_weak_sandbox": True}]
    if command == "grpo":
        config = load_config(grpo.GRPOConfig, None, {
            "model": model, "data": str(data), "output_dir": str(tmp_path / "run"), "rewards": reward_spec,
            "batch_size": 2, "group_size": 2, "max_steps": 1, "progress": False, "report_to": []})
        train = grpo.train
    else:
        config = load_config(best_of_n.BestOfNConfig, None, {
            "model": model, "data": str(data), "output_dir": str(tmp_path / "run"), "rewards": reward_spec})
        train = best_of_n.run
    with pytest.raises(CodeTestsError, match=r"code\.jsonl, row 2, field 'tests\[0\]\.output'"):
        train(config)
