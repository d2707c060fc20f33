"""Property-based input hardening: whatever bytes or values arrive, loaders either succeed or raise a
clear DataError / ConfigError naming the place, never an internal traceback."""

import json

from hypothesis import HealthCheck, given, settings, strategies as st

from tether.config import ConfigError, load_config
from tether.data.loading import DataError, load_rows
from tether.data.sft import build_sft_examples
from tether.models.tiny import tiny_tokenizer
from tether.recipes.sft import SFTConfig

TOKENIZER = tiny_tokenizer()
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
row_keys = st.sampled_from(["prompt", "completion", "messages", "text", "role", "content", "label", "x"])
rows = st.dictionaries(row_keys, json_values | st.lists(st.dictionaries(
    st.sampled_from(["role", "content"]), st.sampled_from(["user", "assistant", "system", "bot"]) | st.text(
        max_size=20)), max_size=4), max_size=4)


@SETTINGS
@given(st.binary(max_size=400))
def test_arbitrary_bytes_in_a_jsonl_file(tmp_path, content):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    try:
        loaded = load_rows(str(path))
    except DataError as err:
        assert str(err).startswith(str(path))
    else:
        assert all(isinstance(r, dict) for r in loaded)


@SETTINGS
@given(st.lists(rows, min_size=1, max_size=5))
def test_arbitrary_rows_either_tokenize_or_name_row_and_field(rows_in):
    try:
        examples, stats = build_sft_examples(rows_in, TOKENIZER, source="f.jsonl", max_length=64, overlong="drop")
    except DataError as err:
        assert str(err).startswith("f.jsonl, row ")
    else:
        assert len(examples) + stats.dropped == len(rows_in)
        assert all(sum(e.loss_mask) > 0 and len(e.input_ids) <= 64 for e in examples)


@SETTINGS
@given(st.text(max_size=80) | st.from_regex(r"[a-z_.]{1,12}=[^\n]{0,12}", fullmatch=True))
def test_arbitrary_overrides_give_config_errors(override):
    try:
        load_config(SFTConfig, None, [override])
    except ConfigError as err:
        assert str(err)


@SETTINGS
@given(st.dictionaries(st.sampled_from(["model", "batch_size", "lora", "learning_rate", "epochs", "seed", "bogus"]),
                       json_values, max_size=4))
def test_arbitrary_yaml_mappings_give_config_errors(tmp_path, mapping):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(mapping))  # JSON is YAML
    try:
        config = load_config(SFTConfig, path)
    except ConfigError as err:
        assert "config" in str(err)
    else:
        assert isinstance(config.batch_size, int) and isinstance(config.learning_rate, float)


def test_huge_row_and_odd_unicode(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"prompt": "\u202e\u0000\U0001f600 ok", "completion": "x" * 200_000}) + "\n",
                    encoding="utf-8")
    rows_in = load_rows(str(path))
    try:
        build_sft_examples(rows_in, TOKENIZER, source=str(path), max_length=128)
    except DataError as err:
        assert "row 0" in str(err) and "max_length=128" in str(err)
    kept, stats = build_sft_examples(rows_in, TOKENIZER, source=str(path), max_length=128, overlong="truncate")
    assert len(kept[0].input_ids) == 128 and stats.truncated == 1


def test_wrong_encoding_is_named(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"text": "café"}, ensure_ascii=False).encode("latin-1") + b"\n")
    try:
        load_rows(str(path))
    except DataError as err:
        assert "not UTF-8" in str(err) and "latin1.jsonl" in str(err)
    else:
        raise AssertionError("latin-1 bytes were accepted as UTF-8")
