"""Data loading and SFT tokenization: every format, the loss mask, and errors that name file, row and field."""

import json

import pytest

from tether.data.batching import BatchOrder, collate_sft
from tether.data.loading import DataError, load_rows
from tether.data.sft import build_sft_examples
from tether.models.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_every_file_format_loads_the_same_rows(tmp_path):
    import pandas as pd

    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"}]
    frame = pd.DataFrame(rows)
    frame.to_parquet(tmp_path / "d.parquet")
    frame.to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    write_jsonl(tmp_path / "d.jsonl", rows)
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.parquet", "d.csv", "d.json", "d.jsonl", "saved"):
        assert load_rows(str(tmp_path / name)) == rows, name


def test_prompt_completion_mask_covers_completion_and_eos(tok):
    examples, _ = build_sft_examples([{"prompt": "1+2=", "completion": "3"}], tok, source="mem", max_length=64)
    ex = examples[0]
    assert tok.decode(ex.input_ids) == "1+2=3</s>"
    assert ex.loss_mask == [0, 0, 0, 0, 1, 1]


def test_completion_segments_mask_the_tool_output(tok):
    """A completion in text segments: "train": false (a tool's output) is context only; the rest and EOS are
    learned. Hand-built: "2*3=" (4 tokens, unlearned), "<c>" 3 learned, "6" unlearned, "!" learned, EOS learned."""
    row = {"prompt": "2*3=", "completion": [{"text": "<c>"}, {"text": "6", "train": False}, {"text": "!"}]}
    ex = build_sft_examples([row], tok, source="mem", max_length=64)[0][0]
    assert tok.decode(ex.input_ids) == "2*3=<c>6!</s>"
    assert ex.loss_mask == [0, 0, 0, 0, 1, 1, 1, 0, 1, 1]
    plain = build_sft_examples([{"prompt": "2*3=", "completion": "<c>6!"}], tok, source="mem", max_length=64)[0][0]
    assert plain.input_ids == ex.input_ids  # the same tokens: only the mask differs
    for bad, says in [([{"text": "6", "train": False}], "nothing to learn"), ([{"text": ""}], "non-empty string"),
                      ([{"text": "a", "train": "no"}], "train: true|false")]:
        with pytest.raises(DataError, match=says):
            build_sft_examples([{"prompt": "p", "completion": bad}], tok, source="mem", max_length=64)


def test_messages_mask_only_assistant_turns(tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"}]
    examples, _ = build_sft_examples([{"messages": messages}], tok, source="mem", max_length=200)
    ex = examples[0]
    learned = tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
    # The span runs to where the template ends the turn (ChatML: "<|im_end|>\n").
    assert learned == "b<|im_end|>\nd<|im_end|>\n"
    last, _ = build_sft_examples([{"messages": messages}], tok, source="mem", max_length=200, train_on="last")
    assert tok.decode([t for t, m in zip(last[0].input_ids, last[0].loss_mask) if m]) == "d<|im_end|>\n"


def test_text_rows_learn_every_token(tok):
    examples, _ = build_sft_examples([{"text": "hello"}], tok, source="mem", max_length=64)
    assert examples[0].loss_mask == [1] * 6


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a"}, "d.jsonl, row 1, field 'completion': missing field"),
    ({"prompt": "a", "completion": "  "}, "d.jsonl, row 1, field 'completion': empty completion"),
    ({"prompt": "a", "completion": 5}, "d.jsonl, row 1, field 'completion': expected a string or a message list"),
    ({"messages": [{"role": "assistant", "content": "x"}]},
     "d.jsonl, row 1, field 'messages[0].role': roles out of order: expected a user turn here, got assistant"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]},
     "d.jsonl, row 1, field 'messages[1].role': unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]},
     "d.jsonl, row 1, field 'messages[1].role': roles out of order: a system message may only come first"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]},
     "d.jsonl, row 1, field 'messages[1].content': content must be a string"),
    ({"messages": [{"role": "user", "content": "x"}]},
     "d.jsonl, row 1, field 'messages': the last message must be an assistant turn"),
    ({"question": "x"}, "d.jsonl, row 1: unrecognised row with fields ['question']"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, tok, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "completion": "fine"}, row])
    with pytest.raises(DataError) as info:
        build_sft_examples(load_rows(path), tok, source=path, max_length=64)
    assert message in str(info.value)
    assert str(info.value).startswith(str(tmp_path / "d.jsonl"))


def test_malformed_files_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad.jsonl, row 1: invalid JSON on line 2"):
        load_rows(str(path))
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match="line 1 is a list, expected a JSON object"):
        load_rows(str(path))
    path.write_bytes(b'{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        load_rows(str(path))
    path.write_text("")
    with pytest.raises(DataError, match="no rows"):
        load_rows(str(path))
    with pytest.raises(DataError, match="file not found"):
        load_rows(str(tmp_path / "missing.jsonl"))


def test_overlong_policies_are_explicit_and_counted(tok):
    rows = [{"prompt": "p", "completion": "x" * 30}, {"prompt": "p", "completion": "y"}]
    with pytest.raises(DataError, match=r"row 0: 32 tokens > max_length=10; raise max_length or set overlong"):
        build_sft_examples(rows, tok, source="mem", max_length=10)
    kept, stats = build_sft_examples(rows, tok, source="mem", max_length=10, overlong="truncate")
    assert [len(e.input_ids) for e in kept] == [10, 3] and stats.truncated == 1 and stats.dropped == 0
    kept, stats = build_sft_examples(rows, tok, source="mem", max_length=10, overlong="drop")
    assert [e.row for e in kept] == [1] and stats.dropped == 1 and stats.dropped_rows == [0]
    assert "2 rows, 0 truncated, 1 dropped" in stats.summary("mem")


def test_batch_order_is_a_permutation_per_epoch_and_resumable():
    order = BatchOrder(10, 4, seed=3)
    first_epoch = sum((order.batch(s) for s in range(5)), [])[:10]
    assert sorted(first_epoch) == list(range(10))
    fresh = BatchOrder(10, 4, seed=3)
    assert fresh.batch(4) == order.batch(4)  # position depends only on the step


def test_collate_aligns_loss_mask_with_targets(tok):
    examples, _ = build_sft_examples([{"prompt": "ab", "completion": "c"}, {"prompt": "a", "completion": "bcd"}],
                                     tok, source="mem", max_length=64)
    batch = collate_sft(examples, tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # targets are input_ids[:, 1:]; the mask marks "c</s>" and "bcd</s>"
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0], [1, 1, 1, 1]]
