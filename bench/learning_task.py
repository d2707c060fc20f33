"""The learning benchmark's task (bench/learning.py): sort a string of digits.

A prompt is `sort 4 digits: 3912=` and the answer is the digits in ascending order, `1239`. The reward is 1 for
the exact answer (what the model writes before its first space or end of text), else the fraction of positions
that are right, halved, so a near miss still ranks above noise within a group. Held-out accuracy counts exact
answers only. The task is the project's own (not the demo's a + b): it needs a little algorithm, a small model
gets part of the way by imitation, and reinforcement can take it further.
"""

from __future__ import annotations

import random

DIGITS = 5  # digits per prompt


def prompt_of(digits: str) -> str:
    return f"sort {len(digits)} digits: {digits}="


def answer_of(digits: str) -> str:
    return "".join(sorted(digits))


def draw(rng: random.Random, n: int, exclude: set[str] = frozenset()) -> list[str]:
    """`n` distinct digit strings of length DIGITS, none of them in `exclude`."""
    seen, out = set(exclude), []
    while len(out) < n:
        digits = "".join(rng.choice("0123456789") for _ in range(DIGITS))
        if digits not in seen:
            seen.add(digits)
            out.append(digits)
    return out


def parse(completion: str) -> str:
    """The model's answer: the completion up to its first space or line break."""
    return completion.strip().split()[0] if completion.strip() else ""


def score(completion: str, answer: str) -> float:
    """1.0 for the exact answer; else half the fraction of positions right (0.0 for an empty answer)."""
    got = parse(completion)
    if got == answer:
        return 1.0
    return 0.5 * sum(a == b for a, b in zip(got, answer)) / len(answer)


def reward(prompts: list[str], completions: list, answer: list[str], **columns) -> list[float]:
    """The reward function both libraries call (TRL's and tether's contract); `answer` is a dataset column."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [score(text, ans) for text, ans in zip(texts, answer)]
