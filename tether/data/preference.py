"""Preference data: paired rows for reward models and DPO, unpaired rows for KTO → token ids.

Row formats (the ones TRL and the Hub use):

    explicit   {"prompt": P, "chosen": C, "rejected": R}        P, C, R strings or message lists
    implicit   {"chosen": C, "rejected": R}                      full conversations sharing a prefix
    unpaired   {"prompt": P, "completion": C, "label": true}     KTO; label is a JSON bool

Implicit prompt (Anthropic HH style): the prompt is the longest shared prefix that ends at a turn
boundary. For text with "\\n\\nHuman:" / "\\n\\nAssistant:" markers, the prompt ends right after the last
"\\n\\nAssistant:" marker inside the shared prefix; for message lists, it is the shared leading messages
(up to the first assistant turn where the two conversations part). A paired row may carry a numeric
`margin` (Llama 2's preference-strength margin for the reward model).

A bad row (a missing field, an empty side, chosen identical to rejected, a label that is not a bool) is a
`DataError` naming the file, the row and the field; with `skip_bad_rows=True` it is skipped instead and
counted in the log. Nothing is dropped silently.
"""

from __future__ import annotations

import logging
import numbers
import os
from dataclasses import dataclass, field

import torch

from tether.data.batching import pad
from tether.data.loading import DataError, load_rows
from tether.data.sft import absent, encode_prompt_completion, surely_longer, text_characters

log = logging.getLogger(__name__)

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
Text = str | list  # a string or a list of {role, content} messages


@dataclass
class PreferenceRow:
    """A validated pair before tokenization: one prompt, two different completions."""

    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None = None
    row: int = 0


@dataclass
class UnpairedRow:
    """A validated KTO row: one completion with a desirable (True) / undesirable (False) label."""

    prompt: Text
    completion: Text
    label: bool
    row: int = 0


@dataclass
class PreferencePair:
    """A tokenized pair; the loss covers the completion tokens only."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0
    row: int = 0


@dataclass
class UnpairedExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    row: int = 0


@dataclass
class PreferenceStats:
    """Counts of what loading did to the rows; `summary` is always logged."""

    total: int = 0
    kept: int = 0
    skipped: int = 0
    skipped_rows: list[int] = field(default_factory=list)
    first_errors: list[str] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    dropped_rows: list[int] = field(default_factory=list)

    def skip(self, error: DataError) -> None:
        self.skipped += 1
        self.skipped_rows.append(error.row)
        if len(self.first_errors) < 3:
            self.first_errors.append(str(error))

    def summary(self, source: str) -> str:
        text = (f"{source}: {self.total} rows → {self.kept} examples; {self.skipped} bad rows skipped, "
                f"{self.truncated} truncated, {self.dropped} dropped as too long")
        if self.skipped:
            text += f"; skipped rows {self.skipped_rows[:10]}{'...' if self.skipped > 10 else ''}, first: " \
                    + " | ".join(self.first_errors)
        if self.dropped:
            text += f"; dropped rows {self.dropped_rows[:10]}{'...' if self.dropped > 10 else ''}"
        return text


# ----------------------------------------------------------------------------- implicit prompt


def split_implicit_prompt(chosen: Text, rejected: Text, *, source: str = "", row: int = 0):
    """(prompt, chosen_completion, rejected_completion) of two conversations that share a prefix.

    Text (Anthropic HH): the prompt ends after the last "\\n\\nAssistant:" marker of the shared prefix, so
    "\\n\\nHuman: hi\\n\\nAssistant: yes" / "...Assistant: no" → prompt "\\n\\nHuman: hi\\n\\nAssistant:",
    completions " yes" / " no". Message lists: the prompt is the shared leading messages, backed off to
    end just before an assistant turn that both conversations have.
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        shared = os.path.commonprefix([chosen, rejected])
        cut = shared.rfind(ASSISTANT)
        if cut < 0:
            raise DataError(source, f"no shared prompt: chosen and rejected have no common prefix ending with "
                                    f"{ASSISTANT!r}; give a 'prompt' field, or use HH-style "
                                    f"'\\n\\nHuman:' / '\\n\\nAssistant:' markers", row, "chosen")
        end = cut + len(ASSISTANT)
        return chosen[:end], chosen[end:], rejected[end:]
    if isinstance(chosen, list) and isinstance(rejected, list):
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        # Back off until both conversations continue with an assistant turn: the completions start there.
        while shared > 0 and not (shared < len(chosen) and shared < len(rejected)
                                  and _role(chosen[shared]) == "assistant" == _role(rejected[shared])):
            shared -= 1
        if shared == 0:
            raise DataError(source, "no shared prompt: chosen and rejected share no leading messages before an "
                                    "assistant turn; give a 'prompt' field", row, "chosen")
        return chosen[:shared], chosen[shared:], rejected[shared:]
    raise DataError(source, f"chosen is a {type(chosen).__name__} but rejected is a {type(rejected).__name__}; "
                            "both must be strings or both message lists", row, "rejected")


def _role(message) -> str | None:
    return message.get("role") if isinstance(message, dict) else None


# ----------------------------------------------------------------------------- row validation


def _text_field(row: dict, key: str, source: str, index: int) -> Text:
    """A present, non-empty string or message list."""
    if absent(row, key):
        raise DataError(source, f"{absent(row, key)}; preference rows need 'chosen' and 'rejected' "
                                f"(and 'prompt' unless they are full conversations)", index, key)
    value = row[key]
    if not isinstance(value, (str, list)):
        raise DataError(source, f"expected a string or a message list, got {type(value).__name__}", index, key)
    _require_nonempty(value, source, index, key)
    return value


def _require_nonempty(value: Text, source: str, index: int, key: str) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(source, "empty text: both sides of a pair need a completion", index, key)
        return
    if not value:
        raise DataError(source, "empty message list: both sides of a pair need a completion", index, key)
    contents = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "assistant"]
    if not any(isinstance(c, str) and c.strip() for c in contents):
        raise DataError(source, "no non-empty assistant message: both sides of a pair need a completion", index, key)


def _is_conversation(value: Text) -> bool:
    """A message list that starts with a non-assistant turn holds its own prompt."""
    return isinstance(value, list) and bool(value) and _role(value[0]) != "assistant"


def parse_preference_row(row: dict, source: str, index: int, *, margin_column: str = "margin") -> PreferenceRow:
    """Validate one paired row (explicit or implicit prompt) → PreferenceRow; raises DataError."""
    if "chosen" not in row and ("completion" in row or "label" in row):
        raise DataError(source, "this is an unpaired (KTO) row {prompt, completion, label}; train it with "
                                "loss=kto, or give 'chosen' and 'rejected'", index, "chosen")
    chosen = _text_field(row, "chosen", source, index)
    rejected = _text_field(row, "rejected", source, index)
    if type(chosen) is not type(rejected):
        raise DataError(source, f"chosen is a {type(chosen).__name__} but rejected is a "
                                f"{type(rejected).__name__}; both must be strings or both message lists", index,
                        "rejected")
    if chosen == rejected:
        raise DataError(source, "identical to 'chosen': a preference pair needs two different completions", index,
                        "rejected")
    prompt = row.get("prompt")
    if prompt is None or (_is_conversation(chosen) and _is_conversation(rejected)):
        # Implicit prompt; a row whose chosen/rejected are full conversations (e.g. UltraFeedback) also
        # takes its prompt from the shared prefix, which then includes the `prompt` turn itself.
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected, source=source, row=index)
        _require_nonempty(chosen, source, index, "chosen")
        _require_nonempty(rejected, source, index, "rejected")
    elif not isinstance(prompt, (str, list)):
        raise DataError(source, f"expected a string or a message list, got {type(prompt).__name__}", index, "prompt")
    margin = None
    if margin_column and row.get(margin_column) is not None:
        value = row[margin_column]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise DataError(source, f"expected a number, got {value!r}", index, margin_column)
        margin = float(value)
    return PreferenceRow(prompt, chosen, rejected, margin, index)


def parse_unpaired_row(row: dict, source: str, index: int) -> UnpairedRow:
    """Validate one KTO row {prompt, completion, label: bool} → UnpairedRow; raises DataError."""
    for key in ("prompt", "completion", "label"):
        if absent(row, key):
            raise DataError(source, f"{absent(row, key)}; unpaired (KTO) rows need 'prompt', 'completion' and 'label' "
                                    f"(or give paired rows with 'chosen'/'rejected')", index, key)
    prompt, completion, label = row["prompt"], row["completion"], row["label"]
    if not isinstance(prompt, (str, list)):
        raise DataError(source, f"expected a string or a message list, got {type(prompt).__name__}", index, "prompt")
    if not isinstance(completion, (str, list)):
        raise DataError(source, f"expected a string or a message list, got {type(completion).__name__}", index,
                        "completion")
    _require_nonempty(completion, source, index, "completion")
    if not isinstance(label, bool):
        raise DataError(source, f"expected true (desirable) or false (undesirable), got {label!r} "
                                f"({type(label).__name__})", index, "label")
    return UnpairedRow(prompt, completion, label, index)


def _collect(rows: list[dict], parse, source: str, skip_bad_rows: bool, stats: PreferenceStats) -> list:
    parsed = []
    for index, row in enumerate(rows):
        try:
            parsed.extend(parse(row, index))
        except DataError as error:
            if not skip_bad_rows:
                raise
            stats.skip(error)
    return parsed


def read_preference_rows(rows: list[dict], *, source: str, skip_bad_rows: bool = False,
                         margin_column: str = "margin") -> tuple[list[PreferenceRow], PreferenceStats]:
    """Validate paired rows; bad rows raise, or are skipped and counted when `skip_bad_rows`."""
    stats = PreferenceStats(total=len(rows))
    parsed = _collect(rows, lambda row, i: [parse_preference_row(row, source, i, margin_column=margin_column)],
                      source, skip_bad_rows, stats)
    return parsed, stats


def read_unpaired_rows(rows: list[dict], *, source: str,
                       skip_bad_rows: bool = False) -> tuple[list[UnpairedRow], PreferenceStats]:
    """Validate KTO rows. Paired rows are accepted too: each gives chosen → True and rejected → False."""

    def parse(row, index):
        if "chosen" in row or "rejected" in row:
            pair = parse_preference_row(row, source, index, margin_column="")
            return [UnpairedRow(pair.prompt, pair.chosen, True, index),
                    UnpairedRow(pair.prompt, pair.rejected, False, index)]
        return [parse_unpaired_row(row, source, index)]

    stats = PreferenceStats(total=len(rows))
    return _collect(rows, parse, source, skip_bad_rows, stats), stats


# ----------------------------------------------------------------------------- tokenization


def _fit(prompt_ids: list[int], completions: list[list[int]], max_length: int, overlong: str, row: int,
         source: str, stats: PreferenceStats):
    """Apply the overlong policy; returns the (possibly truncated) completions, or None to drop the row."""
    longest = len(prompt_ids) + max(len(c) for c in completions)
    if longest <= max_length:
        return completions
    if overlong == "error":
        raise DataError(source, f"{longest} tokens > max_length={max_length}; raise max_length or set "
                                f"overlong=truncate or overlong=drop", row)
    room = max_length - len(prompt_ids)
    if overlong == "truncate" and room > 0:
        truncated = [c[:room] for c in completions]
        if len(truncated) < 2 or truncated[0] != truncated[1]:
            stats.truncated += 1
            return truncated
    stats.dropped += 1
    stats.dropped_rows.append(row)
    return None


def _tokenize_side(tokenizer, prompt, completion, chat_template, source, row, key):
    return encode_prompt_completion(tokenizer, prompt, completion, chat_template=chat_template, source=source,
                                    row=row, field=key)


def tokenize_pair(pair: PreferenceRow, tokenizer, *, source: str, chat_template: str = "auto"):
    """(prompt_ids, chosen_ids, rejected_ids) of a validated pair."""
    prompt_ids, chosen_ids = _tokenize_side(tokenizer, pair.prompt, pair.chosen, chat_template, source, pair.row,
                                            "chosen")
    prompt_ids_r, rejected_ids = _tokenize_side(tokenizer, pair.prompt, pair.rejected, chat_template, source,
                                                pair.row, "rejected")
    if prompt_ids_r != prompt_ids:
        raise DataError(source, "the prompt tokenizes differently before chosen and rejected", pair.row, "prompt")
    if chosen_ids == rejected_ids:
        raise DataError(source, "tokenizes identically to 'chosen': a preference pair needs two different "
                                "completions", pair.row, "rejected")
    return prompt_ids, chosen_ids, rejected_ids


def build_preference_pairs(rows: list[dict], tokenizer, *, source: str, max_length: int, overlong: str = "error",
                           chat_template: str = "auto", skip_bad_rows: bool = False,
                           margin_column: str = "margin") -> tuple[list[PreferencePair], PreferenceStats]:
    """Validate and tokenize paired rows → (pairs, stats); the stats summary is logged."""
    parsed, stats = read_preference_rows(rows, source=source, skip_bad_rows=skip_bad_rows,
                                         margin_column=margin_column)
    pairs = []
    for pair in parsed:
        characters = text_characters(pair.prompt) + max(text_characters(pair.chosen), text_characters(pair.rejected))
        if overlong == "error" and surely_longer(tokenizer, characters, max_length):
            raise DataError(source, f"{characters:,} non-space characters, more than max_length={max_length} tokens "
                                    f"can hold (refused before tokenizing); raise max_length or set "
                                    f"overlong=truncate or overlong=drop", pair.row)
        try:
            prompt_ids, chosen_ids, rejected_ids = tokenize_pair(pair, tokenizer, source=source,
                                                                 chat_template=chat_template)
        except DataError as error:
            if not skip_bad_rows:
                raise
            stats.skip(error)
            continue
        fitted = _fit(prompt_ids, [chosen_ids, rejected_ids], max_length, overlong, pair.row, source, stats)
        if fitted is not None:
            pairs.append(PreferencePair(prompt_ids, fitted[0], fitted[1], pair.margin or 0.0, pair.row))
    return _finish(pairs, stats, source)


def load_pairs(config, tokenizer, source: str) -> list[PreferencePair]:
    """Tokenized `PreferencePair`s of `source` (file or dataset name) under the config's data_split,
    max_length, overlong, chat_template, skip_bad_rows and margin_column keys (`rm`, `pm`)."""
    pairs, _ = build_preference_pairs(load_rows(source, config.data_split), tokenizer, source=source,
                                      max_length=config.max_length, overlong=config.overlong,
                                      chat_template=config.chat_template, skip_bad_rows=config.skip_bad_rows,
                                      margin_column=config.margin_column)
    return pairs


def build_unpaired_examples(rows: list[dict], tokenizer, *, source: str, max_length: int, overlong: str = "error",
                            chat_template: str = "auto",
                            skip_bad_rows: bool = False) -> tuple[list[UnpairedExample], PreferenceStats]:
    """Validate and tokenize KTO rows (unpaired, or paired rows split into two) → (examples, stats)."""
    parsed, stats = read_unpaired_rows(rows, source=source, skip_bad_rows=skip_bad_rows)
    examples = []
    for item in parsed:
        try:
            prompt_ids, completion_ids = _tokenize_side(tokenizer, item.prompt, item.completion, chat_template,
                                                        source, item.row, "completion")
        except DataError as error:
            if not skip_bad_rows:
                raise
            stats.skip(error)
            continue
        fitted = _fit(prompt_ids, [completion_ids], max_length, overlong, item.row, source, stats)
        if fitted is not None:
            examples.append(UnpairedExample(prompt_ids, fitted[0], item.label, item.row))
    return _finish(examples, stats, source)


def _finish(examples: list, stats: PreferenceStats, source: str):
    stats.kept = len(examples)
    if stats.skipped or stats.truncated or stats.dropped:
        log.warning(stats.summary(source))
    else:
        log.info(stats.summary(source))
    if not examples:
        raise DataError(source, "no usable rows left after validation: " + stats.summary(source))
    return examples, stats


# ----------------------------------------------------------------------------- batching


def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected stacked for ONE forward: rows 0..B-1 are chosen, rows B..2B-1 rejected.

    input_ids, attention_mask (2B, T), right-padded to one length; loss_mask (2B, T-1) aligned with the
    next-token targets (1 on completion tokens); margin (B,).
    """
    sequences = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    masks = ([[0] * len(p.prompt_ids) + [1] * len(p.chosen_ids) for p in pairs]
             + [[0] * len(p.prompt_ids) + [1] * len(p.rejected_ids) for p in pairs])
    return {
        "input_ids": pad(sequences, pad_id),  # (2B, T)
        "attention_mask": pad([[1] * len(s) for s in sequences], 0),  # (2B, T)
        "loss_mask": pad(masks, 0)[:, 1:],  # (2B, T-1): token t+1 is predicted at position t
        "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32),  # (B,)
    }


def collate_unpaired(examples: list[UnpairedExample], pad_id: int,
                     completions: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask (B, T), loss_mask (B, T-1) and labels (B,) bool.

    `completions` replaces each example's completion (KTO's mismatched pairs for the KL reference point).
    """
    completions = completions if completions is not None else [e.completion_ids for e in examples]
    sequences = [e.prompt_ids + c for e, c in zip(examples, completions)]
    masks = [[0] * len(e.prompt_ids) + [1] * len(c) for e, c in zip(examples, completions)]
    return {
        "input_ids": pad(sequences, pad_id),
        "attention_mask": pad([[1] * len(s) for s in sequences], 0),
        "loss_mask": pad(masks, 0)[:, 1:],
        "labels": torch.tensor([e.label for e in examples], dtype=torch.bool),
    }
