"""Sampling metrics: pass@k (unbiased), majority vote and maj@k, mean pass@1.

Pure Python, no torch: usable on any list of judged samples.
"""

from __future__ import annotations

import numbers
from collections import Counter
from typing import Any, Callable, Hashable, Sequence


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1).

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

    The product form (Chen et al. 2021, Fig. 3) avoids huge binomials. Needs 0 <= c <= n, 1 <= k <= n.
    """
    n, c, k = _check_count("n", n), _check_count("c", c), _check_count("k", k)
    if n < 1:
        raise ValueError(f"pass_at_k needs n >= 1 samples, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k}, n={n}; sample at least k completions")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems, each given as (n, c)."""
    if not counts:
        raise ValueError("mean_pass_at_k needs at least one (n, c) pair")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def pass_at_1_mean(correct_flags: Sequence) -> float:
    """Mean pass@1: the share of correct samples (DeepSeek-R1's "pass@1 averaged over 64 samples").

    `correct_flags` is one problem's flags (bools or 0/1), or a list of such lists, one per problem,
    in which case each problem's share is averaged (problems weigh equally however many samples).
    """
    if not correct_flags:
        raise ValueError("pass_at_1_mean needs at least one flag")
    if all(isinstance(flags, (list, tuple)) for flags in correct_flags):
        return sum(pass_at_1_mean(flags) for flags in correct_flags) / len(correct_flags)
    return sum(bool(flag) for flag in correct_flags) / len(correct_flags)


def majority_vote(answers: Sequence[Hashable | None], key: Callable[[Any], Hashable] | None = None):
    """The most frequent answer, or None when every answer is None.

    None answers (nothing extracted) never win and are not counted. Ties go to the answer whose
    first appearance is earliest. With `key`, answers are grouped by `key(answer)` (e.g. a
    normalizer) and the first answer of the winning group is returned.
    """
    key = key or (lambda answer: answer)
    counts: Counter = Counter()
    first: dict[Hashable, tuple[int, Any]] = {}  # group -> (first position, first answer)
    for position, answer in enumerate(answers):
        if answer is None:
            continue
        group = key(answer)
        counts[group] += 1
        first.setdefault(group, (position, answer))
    if not counts:
        return None
    winner = min(counts, key=lambda group: (-counts[group], first[group][0]))
    return first[winner][1]


def maj_at_k(
    answers: Sequence[Hashable | None],
    correct: Any,
    k: int | None = None,
    key: Callable[[Any], Hashable] | None = None,
) -> float:
    """maj@k: 1.0 if the majority vote over the first k answers is correct, else 0.0.

    `correct` is the reference answer (compared with ==, after `key` when given) or a function
    `is_correct(answer) -> bool`. `k` defaults to all answers. No answer at all scores 0.0.
    """
    if k is None:
        k = len(answers)
    k = _check_count("k", k)
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj_at_k needs 1 <= k <= len(answers) = {len(answers)}, got k={k}")
    winner = majority_vote(answers[:k], key=key)
    if winner is None:
        return 0.0
    if callable(correct):
        return 1.0 if correct(winner) else 0.0
    if key is not None:
        return 1.0 if key(winner) == key(correct) else 0.0
    return 1.0 if winner == correct else 0.0
