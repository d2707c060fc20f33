"""RL prompts: loading and validating `{prompt, ...}` rows, and the resumable prompt stream.

Every column of a row other than `prompt` travels with it to the reward functions (e.g. `answer`, `tests`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tether.data.batching import BatchOrder
from tether.data.chat import prompt_text, validate_messages
from tether.data.loading import DataError, load_rows

log = logging.getLogger("tether")


@dataclass
class Prompt:
    """One RL prompt: the row's prompt as given (handed to reward functions), its token ids (what the
    sampler continues) and every other column of the row (handed to reward functions too)."""

    prompt: str | list
    ids: list[int]
    columns: dict
    row: int


def load_prompts(source: str, tokenizer, *, split: str = "train", max_prompt_length: int,
                 overlong: str = "error", chat_template: str = "auto") -> list[Prompt]:
    """Validate and tokenize `{prompt, ...}` rows. Overlong prompts follow `overlong`, counted in the log."""
    rows = load_rows(source, split)
    column_names = sorted({key for row in rows for key in row if key != "prompt"})
    prompts, truncated, dropped = [], 0, []
    for index, row in enumerate(rows):
        if "prompt" not in row:
            raise DataError(source, f"missing field; RL rows need 'prompt' (got fields {sorted(row)})", index,
                            "prompt")
        prompt = row["prompt"]
        if isinstance(prompt, list):
            validate_messages(prompt, source, index, "prompt", end_with_assistant=False)
            if chat_template == "never":
                raise DataError(source, "the prompt is a message list but chat_template=never; give it as a string "
                                        "or use chat_template=auto", index, "prompt")
        elif not isinstance(prompt, str) or not prompt.strip():
            raise DataError(source, f"expected a non-empty string or a message list, got {prompt!r:.60}", index,
                            "prompt")
        text = prompt_text(tokenizer, prompt, chat_template=chat_template)
        templated = isinstance(prompt, list) or text is not prompt
        ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
        if len(ids) > max_prompt_length:
            if overlong == "error":
                raise DataError(source, f"prompt has {len(ids)} tokens > max_prompt_length={max_prompt_length}; "
                                        "raise max_prompt_length or set overlong=drop or overlong=truncate", index,
                                "prompt")
            if overlong == "drop":
                dropped.append(index)
                continue
            ids, truncated = ids[-max_prompt_length:], truncated + 1
        columns = {key: row.get(key) for key in column_names}
        prompts.append(Prompt(prompt, ids, columns, index))
    if truncated or dropped:
        log.warning("%s: %d prompts, %d truncated to their last %d tokens, %d dropped as longer than "
                    "max_prompt_length%s", source, len(rows), truncated, max_prompt_length, len(dropped),
                    f" (rows {dropped[:10]}{'...' if len(dropped) > 10 else ''})" if dropped else "")
    if not prompts:
        raise DataError(source, f"every prompt was dropped as longer than max_prompt_length={max_prompt_length}")
    return prompts


def load_prompt_sets(config, tokenizer, reward_set=None) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, held-out prompts or []), each file's rows checked by `reward_set.check_rows` (e.g.
    the code reward's tests) so that a bad row fails now, naming file, row and field, not mid-training."""
    options = dict(split=config.data_split, max_prompt_length=config.max_prompt_length, overlong=config.overlong,
                   chat_template=config.chat_template)
    sets = []
    for source in (config.data, config.eval_data):
        prompts = load_prompts(source, tokenizer, **options) if source else []
        if reward_set is not None and prompts:
            reward_set.check_rows(source, [(p.row, p.columns) for p in prompts])
        sets.append(prompts)
    return sets[0], sets[1]


class PromptStream:
    """An endless, seeded order over the prompts (a fresh permutation per epoch), read from a cursor.

    Dynamic sampling may take more prompts in one step than another, so the position is the cursor, saved
    in checkpoints, not the step number."""

    def __init__(self, n: int, seed: int):
        self.order = BatchOrder(n, 1, seed)
        self.cursor = 0

    def take(self, k: int) -> list[int]:
        indices = [self.order.batch(self.cursor + i)[0] for i in range(k)]
        self.cursor += k
        return indices
