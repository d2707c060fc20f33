"""Toy rewards for the seed-003 exercises (docs/exercises.md), with the reward-function contract:
`fn(prompts, completions, **columns) -> list[float | None]`. Used in the configs as
`{name: examples/exercises/rewards.py:digit_share}`."""


def digit_share(prompts, completions, **columns):
    """Exercises 14, 15, 17, 21: the share of the completion's characters that are digits (0 for an empty one).
    A dense programmatic reward in [0, 1]: the untrained tiny model writes ~10% digits."""
    return [sum(c.isdigit() for c in text) / len(text) if text else 0.0 for text in completions]


def polite(prompts, completions, **columns):
    """Exercises 18, 20: 1 if the answer ends politely, with "!" (e.g. "thanks!"), else 0. The character-level
    tiny model ends ~2% of its untrained two-character answers that way."""
    return [1.0 if text.rstrip().endswith("!") else 0.0 for text in completions]
