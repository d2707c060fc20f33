"""Supervised fine-tuning data: {prompt, completion}, {messages} or {text} rows → token ids + loss mask."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tether.data.chat import prompt_text, tokenize_messages, validate_messages
from tether.data.loading import DataError

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One tokenized training example; `loss_mask[t] = 1` where token t is learned."""

    input_ids: list[int]
    loss_mask: list[int]
    row: int = 0


@dataclass
class LengthStats:
    """How many rows the overlong policy truncated or dropped (always logged, never silent)."""

    total: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_rows: list[int] = field(default_factory=list)

    def summary(self, source: str) -> str:
        return (f"{source}: {self.total} rows, {self.truncated} truncated, {self.dropped} dropped"
                + (f" (rows {self.dropped_rows[:10]}{'...' if self.dropped > 10 else ''})" if self.dropped else ""))


def absent(row: dict, key: str) -> str | None:
    """Why `row[key]` cannot be used: "missing field" (no such key), "is null" (JSON null), or None when present."""
    if key not in row:
        return "missing field"
    return "is null" if row[key] is None else None


def _require_string(row: dict, key: str, source: str, index: int, *, allow_empty: bool = False) -> str:
    if absent(row, key):
        raise DataError(source, f"{absent(row, key)}; this format needs '{key}' as a string", index, key)
    value = row[key]
    if not isinstance(value, str):
        raise DataError(source, f"expected a string, got {type(value).__name__}", index, key)
    if not allow_empty and not value.strip():
        raise DataError(source, "empty string", index, key)
    return value


def text_characters(value) -> int:
    """Non-whitespace characters of a text: a string, a message's `content`, a segment's `text`, or a list."""
    if isinstance(value, str):
        return len(value) - sum(value.count(space) for space in " \n\t\r")
    if isinstance(value, dict):  # a message, or a completion segment ({text, train})
        return text_characters(value.get("content", value.get("text")))
    if isinstance(value, (list, tuple)):
        return sum(text_characters(item) for item in value)
    return 0


def sft_characters(row: dict) -> int:
    """Non-whitespace characters of the text an SFT row trains on (the fields `_encode_row` reads)."""
    if "messages" in row:
        return text_characters(row["messages"])
    if "prompt" in row or "completion" in row:
        return text_characters(row.get("prompt")) + text_characters(row.get("completion"))
    return text_characters(row.get("text"))


def max_token_characters(tokenizer) -> int:
    """The longest token's text in the vocabulary (cached on the tokenizer): no token covers more characters."""
    longest = getattr(tokenizer, "_tether_max_token_characters", None)
    if longest is None:
        longest = max(len(token) for token in tokenizer.get_vocab())
        tokenizer._tether_max_token_characters = longest
    return longest


def surely_longer(tokenizer, characters: int, max_length: int) -> bool:
    """True when text of `characters` non-space characters needs more than `max_length` tokens, known without
    tokenizing it: a token covers at most `max_token_characters` of them, so a 10 MB line is refused in
    milliseconds instead of being tokenized whole first. False means only "tokenize to find out"."""
    return characters > max_length * max_token_characters(tokenizer)


def encode_prompt_completion(tokenizer, prompt, completion, *, chat_template: str = "auto",
                             source: str = "", row: int = 0, field: str = "completion"):
    """(prompt_ids, completion_ids) for a prompt and completion given as strings or message lists.

    Strings: the prompt is tokenized with the tokenizer's special tokens (e.g. BOS) and the completion
    without, then EOS is appended, so the model learns to stop. Message lists: the completion turns are
    rendered after the prompt turns by the chat template.
    """
    if isinstance(completion, list):
        if not isinstance(prompt, list):
            prompt = [{"role": "user", "content": prompt}]
        validate_messages(prompt + completion, source, row, field="prompt+" + field)
        ids, _ = tokenize_messages(tokenizer, prompt + completion, train_on="all", source=source, row=row)
        prompt_ids = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids:
            raise DataError(source, "the chat template does not render the prompt as a prefix of the conversation",
                            row, field)
        return prompt_ids, ids[len(prompt_ids):]
    if isinstance(prompt, list):  # a message-list prompt before a string completion: check it before templating
        validate_messages(prompt, source, row, field="prompt", end_with_assistant=False)
        if chat_template == "never":
            raise DataError(source, "the prompt is a message list but chat_template=never; give it as a string or "
                                    "use chat_template=auto", row, "prompt")
    text = prompt_text(tokenizer, prompt, chat_template=chat_template)
    templated = text is not prompt
    prompt_ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>") if templated else tokenizer.eos_token_id
    if end is None or end == tokenizer.unk_token_id:
        end = tokenizer.eos_token_id
    if not completion_ids or completion_ids[-1] != end:
        completion_ids = completion_ids + [end]
    return prompt_ids, completion_ids


def is_segments(completion) -> bool:
    """A completion given as text segments, [{"text": ..., "train": false}, ...] (no "role": not messages)."""
    return (isinstance(completion, list) and bool(completion)
            and all(isinstance(item, dict) and "text" in item and "role" not in item for item in completion))


def encode_segments(tokenizer, prompt, segments: list[dict], *, chat_template: str = "auto", source: str = "",
                    row: int = 0, learn_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(ids, mask) of a prompt and a completion in text segments, each tokenized on its own (as a multi-turn
    rollout tokenizes the model's turns and the observations between them); a segment with "train": false
    (a tool's output, an environment's observation) is context, not learned. EOS ends the completion, learned."""
    for position, segment in enumerate(segments):
        field_name = f"completion[{position}]"
        if not isinstance(segment["text"], str) or not segment["text"]:
            raise DataError(source, "a segment's 'text' must be a non-empty string", row, field_name)
        if not isinstance(segment.get("train", True), bool) or set(segment) - {"text", "train"}:
            raise DataError(source, "a segment is {text: str, train: true|false} (train false: context only, e.g. "
                                    f"a tool's output), got keys {sorted(segment)}", row, field_name)
    if not any(segment.get("train", True) for segment in segments):
        raise DataError(source, "every segment has train: false; nothing to learn", row, "completion")
    prompt_ids, first = encode_prompt_completion(tokenizer, prompt, segments[0]["text"], chat_template=chat_template,
                                                 source=source, row=row)  # first[-1]: the end token (EOS)
    ids, mask = list(prompt_ids), [int(learn_prompt)] * len(prompt_ids)
    for segment in segments:
        piece = tokenizer(segment["text"], add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(segment.get("train", True))] * len(piece)
    return ids + [first[-1]], mask + [1]


def build_sft_examples(rows: list[dict], tokenizer, *, source: str, max_length: int, overlong: str = "error",
                       train_on: str = "completion", chat_template: str = "auto"):
    """Validate and tokenize SFT rows. Returns (examples, LengthStats).

    `train_on`: "completion" learns only completion / assistant tokens (default), "last" only the last
    assistant turn, "all" every token.
    """
    examples, stats = [], LengthStats(total=len(rows))
    for index, row in enumerate(rows):
        if overlong != "truncate" and surely_longer(tokenizer, sft_characters(row), max_length):
            if overlong == "error":
                raise DataError(source, f"{sft_characters(row):,} non-space characters, more than max_length="
                                        f"{max_length} tokens can hold (refused before tokenizing); raise "
                                        f"max_length or set overlong=truncate or overlong=drop", index)
            stats.dropped += 1
            stats.dropped_rows.append(index)
            continue
        ids, mask = _encode_row(row, tokenizer, source, index, train_on, chat_template)
        if len(ids) > max_length:
            if overlong == "error":
                raise DataError(source, f"{len(ids)} tokens > max_length={max_length}; raise max_length or set "
                                        f"overlong=truncate or overlong=drop", index)
            if overlong == "truncate" and sum(mask[:max_length]) > 0:
                ids, mask = ids[:max_length], mask[:max_length]
                stats.truncated += 1
            else:  # drop, or truncation would leave nothing to learn
                stats.dropped += 1
                stats.dropped_rows.append(index)
                continue
        if sum(mask) == 0:
            raise DataError(source, "no tokens to learn after tokenization", index)
        examples.append(Example(ids, mask, index))
    if stats.truncated or stats.dropped:
        log.warning(stats.summary(source))
    if not examples:
        raise DataError(source, f"every row was dropped as longer than max_length={max_length}")
    return examples, stats


def _encode_row(row: dict, tokenizer, source: str, index: int, train_on: str, chat_template: str):
    if "messages" in row:
        messages = row["messages"]
        validate_messages(messages, source, index)
        mode = {"completion": "assistant"}.get(train_on, train_on)
        return tokenize_messages(tokenizer, messages, train_on=mode, source=source, row=index)
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        for key, value in (("prompt", prompt), ("completion", completion)):
            if value is None:
                raise DataError(source, f"{absent(row, key)}; the prompt/completion format needs '{key}'", index, key)
            if isinstance(value, str):
                if key == "completion" and not value.strip():
                    raise DataError(source, "empty completion", index, key)
            elif not isinstance(value, list):
                raise DataError(source, f"expected a string or a message list, got {type(value).__name__}", index,
                                key)
        if is_segments(completion):
            return encode_segments(tokenizer, prompt, completion, chat_template=chat_template, source=source,
                                   row=index, learn_prompt=train_on == "all")
        prompt_ids, completion_ids = encode_prompt_completion(tokenizer, prompt, completion,
                                                              chat_template=chat_template, source=source, row=index)
        ids = prompt_ids + completion_ids
        learn_prompt = 1 if train_on == "all" else 0
        return ids, [learn_prompt] * len(prompt_ids) + [1] * len(completion_ids)
    if "text" in row:
        text = _require_string(row, "text", source, index)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        return ids, [1] * len(ids)
    raise DataError(source, f"unrecognised row with fields {sorted(row)}; SFT rows need "
                            "{prompt, completion}, {messages} or {text}", index)
