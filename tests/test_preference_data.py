"""Preference data: implicit-prompt splitting, validation errors naming file/row/field, skip counts, batching."""

import json
import logging

import pytest

from tether.data.loading import DataError, load_rows
from tether.data.preference import (
    build_preference_pairs,
    build_unpaired_examples,
    collate_pairs,
    parse_preference_row,
    parse_unpaired_row,
    read_unpaired_rows,
    split_implicit_prompt,
)
from tether.models.tiny import tiny_tokenizer

SRC = "prefs.jsonl"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


# ----------------------------------------------------------------------------- implicit prompt


def test_hh_text_single_turn():
    prompt, chosen, rejected = split_implicit_prompt("\n\nHuman: hi?\n\nAssistant: yes",
                                                     "\n\nHuman: hi?\n\nAssistant: no")
    assert (prompt, chosen, rejected) == ("\n\nHuman: hi?\n\nAssistant:", " yes", " no")


def test_hh_text_multi_turn_splits_at_last_shared_assistant_marker():
    history = "\n\nHuman: a?\n\nAssistant: b\n\nHuman: c?\n\nAssistant:"
    prompt, chosen, rejected = split_implicit_prompt(history + " I think yes", history + " I think no")
    # The shared prefix runs on into " I think ", but the prompt ends at the turn boundary.
    assert (prompt, chosen, rejected) == (history, " I think yes", " I think no")


def test_hh_text_diverging_in_an_earlier_turn_keeps_later_turns_in_the_completions():
    chosen = "\n\nHuman: a?\n\nAssistant: good\n\nHuman: c?\n\nAssistant: d"
    rejected = "\n\nHuman: a?\n\nAssistant: bad\n\nHuman: c?\n\nAssistant: d"
    prompt, c, r = split_implicit_prompt(chosen, rejected)
    assert prompt == "\n\nHuman: a?\n\nAssistant:"
    assert c == " good\n\nHuman: c?\n\nAssistant: d" and r == " bad\n\nHuman: c?\n\nAssistant: d"


def test_messages_multi_turn_shared_leading_messages():
    history = [user("a?"), assistant("b"), user("c?")]
    prompt, chosen, rejected = split_implicit_prompt(history + [assistant("yes")], history + [assistant("no")])
    assert prompt == history and chosen == [assistant("yes")] and rejected == [assistant("no")]


def test_messages_diverging_in_an_earlier_turn():
    chosen = [user("a?"), assistant("good"), user("c?"), assistant("d")]
    rejected = [user("a?"), assistant("bad"), user("c?"), assistant("d")]
    prompt, c, r = split_implicit_prompt(chosen, rejected)
    assert prompt == [user("a?")] and c == chosen[1:] and r == rejected[1:]


def test_messages_with_system_prompt():
    system = {"role": "system", "content": "be brief"}
    prompt, c, r = split_implicit_prompt([system, user("q"), assistant("x")], [system, user("q"), assistant("y")])
    assert prompt == [system, user("q")] and c == [assistant("x")] and r == [assistant("y")]


def test_implicit_text_without_markers_is_an_error_naming_row_and_field():
    with pytest.raises(DataError, match=r"prefs.jsonl, row 4, field 'chosen': no shared prompt"):
        parse_preference_row({"chosen": "abc yes", "rejected": "abc no"}, SRC, 4)


def test_parse_explicit_and_implicit_rows():
    row = parse_preference_row({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2}, SRC, 0)
    assert (row.prompt, row.chosen, row.rejected, row.margin) == ("p", "a", "b", 2.0)
    row = parse_preference_row({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
                               SRC, 0)
    assert (row.prompt, row.chosen, row.rejected) == ("\n\nHuman: q\n\nAssistant:", " a", " b")
    # UltraFeedback style: a prompt field AND full conversations; the conversations' shared prefix wins.
    row = parse_preference_row({"prompt": "q", "chosen": [user("q"), assistant("a")],
                                "rejected": [user("q"), assistant("b")]}, SRC, 0)
    assert row.prompt == [user("q")] and row.chosen == [assistant("a")]


# ----------------------------------------------------------------------------- bad rows


@pytest.mark.parametrize("row, field, message", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "identical to 'chosen'"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "chosen", "empty text"),
    ({"prompt": "p", "chosen": "a", "rejected": "   "}, "rejected", "empty text"),
    ({"prompt": "p", "chosen": [], "rejected": [assistant("b")]}, "chosen", "empty message list"),
    ({"prompt": "p", "chosen": [assistant("")], "rejected": [assistant("b")]}, "chosen", "no non-empty assistant"),
    ({"prompt": "p", "chosen": "a"}, "rejected", "missing field"),
    ({"prompt": "p", "rejected": "a"}, "chosen", "missing field"),
    ({"prompt": "p", "chosen": 3, "rejected": "a"}, "chosen", "expected a string or a message list"),
    ({"prompt": "p", "chosen": "a", "rejected": [assistant("b")]}, "rejected", "both must be strings"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "expected a number"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant:"}, "rejected", "empty text"),
    ({"prompt": "p", "completion": "c", "label": True}, "chosen", "unpaired (KTO) row"),
])
def test_bad_pair_rows_name_file_row_and_field(row, field, message):
    with pytest.raises(DataError) as info:
        parse_preference_row(row, SRC, 7)
    assert str(info.value).startswith(f"{SRC}, row 7, field '{field}': ")
    assert message in str(info.value)
    assert (info.value.source, info.value.row, info.value.field) == (SRC, 7, field)


@pytest.mark.parametrize("row, field, message", [
    ({"prompt": "p", "completion": "c", "label": "yes"}, "label", "expected true (desirable) or false"),
    ({"prompt": "p", "completion": "c", "label": 1}, "label", "(int)"),
    ({"prompt": "p", "completion": "c"}, "label", "missing field"),
    ({"prompt": "p", "completion": " ", "label": False}, "completion", "empty text"),
    ({"completion": "c", "label": False}, "prompt", "missing field"),
])
def test_bad_kto_rows_name_file_row_and_field(row, field, message):
    with pytest.raises(DataError) as info:
        parse_unpaired_row(row, SRC, 2)
    assert str(info.value).startswith(f"{SRC}, row 2, field '{field}': ") and message in str(info.value)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_row_in_a_file_stops_with_the_file_name(tmp_path, tokenizer):
    source = _write(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                           {"prompt": "p", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match=rf"{source}, row 1, field 'rejected': identical"):
        build_preference_pairs(load_rows(source), tokenizer, source=source, max_length=64)


def test_skip_bad_rows_skips_and_counts_in_the_log(tmp_path, tokenizer, caplog):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "x", "rejected": "x"},  # identical
            {"prompt": "q", "chosen": "c", "rejected": "d"},
            {"prompt": "q", "chosen": "", "rejected": "d"},  # empty side
            {"prompt": "r", "rejected": "e"}]  # missing field
    source = _write(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        pairs, stats = build_preference_pairs(load_rows(source), tokenizer, source=source, max_length=64,
                                              skip_bad_rows=True)
    assert [p.row for p in pairs] == [0, 2]
    assert (stats.total, stats.kept, stats.skipped, stats.skipped_rows) == (5, 2, 3, [1, 3, 4])
    assert "3 bad rows skipped" in caplog.text and "row 1, field 'rejected'" in caplog.text


def test_every_row_bad_is_an_error_even_when_skipping(tokenizer):
    with pytest.raises(DataError, match="no usable rows"):
        build_preference_pairs([{"prompt": "p", "chosen": "a", "rejected": "a"}], tokenizer, source=SRC,
                               max_length=64, skip_bad_rows=True)


# ----------------------------------------------------------------------------- tokenization and batching


def test_collate_pairs_stacks_chosen_then_rejected_with_completion_masks(tokenizer):
    pairs, _ = build_preference_pairs([{"prompt": "ab?", "chosen": "yes", "rejected": "no", "margin": 1.5},
                                       {"prompt": "c?", "chosen": "ok!", "rejected": "nope"}], tokenizer,
                                      source=SRC, max_length=64)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    # One forward for both sides: (2B, T) with T the longest of all four sequences ("ab?" + "yes" + EOS).
    assert batch["input_ids"].shape == (4, 3 + 3 + 1)
    assert batch["loss_mask"].shape == (4, batch["input_ids"].shape[1] - 1)
    assert batch["margin"].tolist() == [1.5, 0.0]
    learned = []
    for row in range(4):
        targets = batch["input_ids"][row, 1:][batch["loss_mask"][row].bool()]
        learned.append(tokenizer.decode(targets))
    assert learned == ["yes</s>", "ok!</s>", "no</s>", "nope</s>"]
    # Padding sits after each sequence and is masked out of attention.
    assert batch["attention_mask"].sum(-1).tolist() == [3 + 3 + 1, 2 + 3 + 1, 3 + 2 + 1, 2 + 4 + 1]


def test_message_pairs_render_through_the_chat_template(tokenizer):
    history = [user("hi"), assistant("hello"), user("ok?")]
    pairs, _ = build_preference_pairs([{"chosen": history + [assistant("yes")],
                                        "rejected": history + [assistant("no")]}], tokenizer, source=SRC,
                                      max_length=256)
    pair = pairs[0]
    prompt_text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(pair.prompt_ids) == prompt_text
    assert tokenizer.decode(pair.chosen_ids) == "yes<|im_end|>\n"
    assert tokenizer.decode(pair.rejected_ids) == "no<|im_end|>\n"


def test_overlong_policies(tokenizer):
    rows = [{"prompt": "abcdef", "chosen": "0123456789", "rejected": "xy"}]
    with pytest.raises(DataError, match="row 0: 17 tokens > max_length=12"):
        build_preference_pairs(rows, tokenizer, source=SRC, max_length=12)
    pairs, stats = build_preference_pairs(rows, tokenizer, source=SRC, max_length=12, overlong="truncate")
    assert len(pairs[0].prompt_ids) + len(pairs[0].chosen_ids) == 12 and stats.truncated == 1
    with pytest.raises(DataError, match="no usable rows"):
        build_preference_pairs(rows, tokenizer, source=SRC, max_length=12, overlong="drop")


def test_kto_rows_unpaired_and_from_pairs(tokenizer):
    items, _ = read_unpaired_rows([{"prompt": "p", "completion": "c", "label": False},
                                   {"prompt": "q", "chosen": "good", "rejected": "bad"}], source=SRC)
    assert [(i.prompt, i.completion, i.label, i.row) for i in items] == [
        ("p", "c", False, 0), ("q", "good", True, 1), ("q", "bad", False, 1)]
    examples, stats = build_unpaired_examples([{"prompt": "p", "completion": "c", "label": True},
                                               {"prompt": "p", "completion": "c", "label": "no"}], tokenizer,
                                              source=SRC, max_length=64, skip_bad_rows=True)
    assert len(examples) == 1 and examples[0].label is True and stats.skipped == 1


def test_example_files_load(tokenizer):
    for name in ("pref_train", "pref_eval", "pref_hh"):
        source = f"examples/data/{name}.jsonl"
        pairs, stats = build_preference_pairs(load_rows(source), tokenizer, source=source, max_length=256)
        assert stats.skipped == 0 and len(pairs) == stats.total
    source = "examples/data/pref_kto.jsonl"
    examples, _ = build_unpaired_examples(load_rows(source), tokenizer, source=source, max_length=256)
    assert {e.label for e in examples} == {True, False}
