"""Length shaping rewards.

- `target`: -|L - target| / target, 0 at the target length and falling linearly on both sides
  (-1 at L = 0 and at L = 2 * target; not clipped).
- `dapo_overlong`: DAPO's soft overlong punishment (Yu et al. 2025, eq. 13):
      0                                  if L <= L_max - L_cache
      ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
      -1                                 if L > L_max

L is counted in tokens by default (`unit="tokens"`): from the `completion_lengths` column the
trainer passes (token counts without padding), else from a `completion_ids` column, else by
encoding the text with the `tokenizer` option. `unit="chars"` counts characters instead.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

from tether.rewards.base import RewardSetupError, as_text

LENGTH_MODES = ("target", "dapo_overlong")
UNITS = ("tokens", "chars")


def overlong_penalty(length: int, max_length: int, cache: int) -> float:
    """DAPO soft overlong punishment, Yu et al. 2025, eq. 13."""
    if length <= max_length - cache:
        return 0.0
    if length <= max_length:
        return ((max_length - cache) - length) / cache
    return -1.0


def target_length_reward(length: int, target: int) -> float:
    """-|L - target| / target."""
    return -abs(length - target) / target


def _encoder(tokenizer: Any):
    """A text -> token count function from a tokenizer object or a Hugging Face name/path."""
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer  # only when asked for by name

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if not hasattr(tokenizer, "encode"):
        raise ValueError(f"length reward: tokenizer must have an encode() method, got {type(tokenizer).__name__}")

    def count(text: str) -> int:
        try:
            return len(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:  # tokenizers without the add_special_tokens keyword
            return len(tokenizer.encode(text))

    return count


def make_length_reward(
    mode: str = "dapo_overlong",
    target: int | None = None,
    max_length: int | None = None,
    cache: int | None = None,
    unit: str = "tokens",
    tokenizer: Any = None,
):
    """Build the `length` reward.

    Args:
        mode: `dapo_overlong` (needs `max_length` and `cache`) or `target` (needs `target`).
        target: the length to aim for in `target` mode.
        max_length: L_max, the generation limit, in `dapo_overlong` mode.
        cache: L_cache, the width of the soft-penalty window before L_max (DAPO: 4096 of 20480).
        unit: `tokens` (default) or `chars`.
        tokenizer: a tokenizer object or Hugging Face name, used for `tokens` only when the batch
            has neither a `completion_lengths` nor a `completion_ids` column.
    """
    if mode not in LENGTH_MODES:
        raise ValueError(f"length reward: mode must be one of {LENGTH_MODES}, got {mode!r}")
    if unit not in UNITS:
        raise ValueError(f"length reward: unit must be one of {UNITS}, got {unit!r}")
    if mode == "target":
        if target is None or target <= 0:
            raise ValueError(f"length reward (mode target) needs target > 0, got {target!r}")
        shape = functools.partial(target_length_reward, target=target)
    else:
        if max_length is None or cache is None:
            raise ValueError(
                "length reward (mode dapo_overlong) needs max_length (the generation limit) and cache "
                "(the soft-penalty window before it, e.g. max_length // 5)"
            )
        if not 0 < cache <= max_length:
            raise ValueError(
                f"length reward: need 0 < cache <= max_length, got cache={cache}, max_length={max_length}"
            )
        shape = functools.partial(overlong_penalty, max_length=max_length, cache=cache)
    count_tokens = _encoder(tokenizer) if tokenizer is not None else None

    def lengths(completions: Sequence, columns: dict) -> list[int]:
        if unit == "chars":
            return [len(as_text(c)) for c in completions]
        if "completion_lengths" in columns:
            return [int(n) for n in columns["completion_lengths"]]
        if "completion_ids" in columns:
            return [len(ids) for ids in columns["completion_ids"]]
        if count_tokens is not None:
            return [count_tokens(as_text(c)) for c in completions]
        raise RewardSetupError(
            "length reward (unit tokens) needs token counts: trainers pass a completion_lengths column; "
            "outside a trainer give the tokenizer option, or set unit: chars"
        )

    def length_reward(prompts: Sequence, completions: Sequence, **columns) -> list[float]:
        return [shape(n) for n in lengths(completions, columns)]

    length_reward.__name__ = "length"
    return length_reward
