"""Chat messages: validation and tokenization through the tokenizer's own chat template."""

from __future__ import annotations

from tether.data.loading import DataError

ROLES = ("system", "user", "assistant", "tool")


def validate_messages(messages, source: str, row: int, field: str = "messages", *, end_with_assistant: bool = True):
    """Check a message list: dicts with string role/content, known roles, system first, user/assistant alternating."""
    if not isinstance(messages, list) or not messages:
        raise DataError(source, "expected a non-empty list of {role, content} messages", row, field)
    expected = "user"
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise DataError(source, f"expected a {{role, content}} object, got {type(message).__name__}", row, where)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(source, f"unknown role {role!r}; expected one of {', '.join(ROLES)}", row, where + ".role")
        if not isinstance(content, str):
            raise DataError(source, f"content must be a string, got {type(content).__name__}", row, where + ".content")
        if role == "system":
            if i != 0:
                raise DataError(source, "roles out of order: a system message may only come first", row, where + ".role")
            continue
        if role == "tool":
            if i == 0 or messages[i - 1]["role"] not in ("assistant", "tool"):
                raise DataError(source, "roles out of order: a tool message must follow an assistant turn", row,
                                where + ".role")
            expected = "assistant"
            continue
        if role != expected:
            raise DataError(source, f"roles out of order: expected a {expected} turn here, got {role}", row,
                            where + ".role")
        expected = "assistant" if role == "user" else "user"
    if end_with_assistant:
        if messages[-1]["role"] != "assistant":
            raise DataError(source, "the last message must be an assistant turn (the one to learn)", row, field)
        if not messages[-1]["content"].strip():
            raise DataError(source, "the last assistant turn is empty", row, field)


def _render_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_messages(tokenizer, messages, *, train_on: str = "assistant", source: str = "", row: int = 0):
    """Token ids of a conversation and a mask that is 1 on the tokens to learn.

    `train_on="assistant"` marks every assistant turn, "last" only the final one, "all" every token.
    Assistant spans are found by rendering growing prefixes of the conversation, so this works with any
    chat template (no `{% generation %}` markers needed); a template that rewrites earlier turns is an error.
    """
    ids = _render_ids(tokenizer, messages, add_generation_prompt=False)
    if train_on == "all":
        return ids, [1] * len(ids)
    mask = [0] * len(ids)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        turns = turns[-1:]
    for i in turns:
        start = len(_render_ids(tokenizer, messages[:i], add_generation_prompt=True))
        end_ids = _render_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if ids[: len(end_ids)] != end_ids:
            raise DataError(source, "the chat template renders earlier turns differently once later turns exist; "
                                    "use train_on=all or a {prompt, completion} format", row, "messages")
        for t in range(start, len(end_ids)):
            mask[t] = 1
    return ids, mask


def prompt_text(tokenizer, prompt, *, chat_template: str = "auto") -> str:
    """The text the model continues for `prompt` (a string or a message list).

    Message lists go through the chat template with the generation prompt. Strings are used as they are,
    unless `chat_template="always"`, which wraps them as one user message.
    """
    if isinstance(prompt, list):
        if chat_template == "never":
            raise ValueError("prompt is a message list but chat_template=never")
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if chat_template == "always":
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def encode_prompt(tokenizer, prompt, chat_template: str) -> list[int]:
    """Prompt token ids exactly as the SFT data path builds them (tether.data.sft), so sampling sees what
    training saw: templated text carries its own special tokens; plain text gets the tokenizer's (e.g. BOS)."""
    text = prompt_text(tokenizer, prompt, chat_template=chat_template)
    templated = text is not prompt
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]
