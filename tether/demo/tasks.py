"""Synthetic tasks for the demos: small enough for a CPU, rich enough to show each method working.

- Arithmetic (RLVR): "23+45=" → "<think>...</think><answer>68</answer>", checked exactly.
- Preferences with a hidden "gold" rule (RLHF/DPO): the stand-in for human judgement.
"""

from __future__ import annotations

import random


def arithmetic_prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def arithmetic_completion(a: int, b: int) -> str:
    """A worked answer: the ones column first (with carry), then the result in the answer tag."""
    ones = a % 10 + b % 10
    return f"<think>{ones}</think><answer>{a + b}</answer>"


def arithmetic_split(n_train: int, n_test: int, *, max_operand: int = 49, seed: int = 0):
    """Disjoint train/test problems (no (a, b) pair appears in both). Rows: prompt, answer, completion."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    rng.shuffle(pairs)
    if n_train + n_test > len(pairs):
        raise ValueError(f"only {len(pairs)} distinct problems with max_operand={max_operand}")
    rows = [{"prompt": arithmetic_prompt(a, b), "answer": str(a + b), "completion": arithmetic_completion(a, b)}
            for a, b in pairs[: n_train + n_test]]
    return rows[:n_train], rows[n_train:]


# ----------------------------------------------------------------------------- preferences

GOOD_WORDS = ["kind", "clear", "calm", "exact", "brief"]
BAD_WORDS = ["rude", "vague", "loud", "wrong", "messy"]
TOPICS = ["tea", "maps", "rain", "code", "bread", "music", "stars", "boats"]


def gold_reward(completion: str) -> float:
    """The hidden rule the reward model must discover: +1 per good word, −1 per bad word, on whole words."""
    words = completion.replace(".", " ").split()
    return float(sum(w in GOOD_WORDS for w in words) - sum(w in BAD_WORDS for w in words))


def preference_rows(n: int, *, seed: int = 0) -> list[dict]:
    """Pairs labelled by `gold_reward`: chosen is the completion the hidden rule scores higher."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        topic = rng.choice(TOPICS)
        first, second = _answer(rng, topic), _answer(rng, topic)
        g1, g2 = gold_reward(first), gold_reward(second)
        if g1 == g2:
            continue
        chosen, rejected = (first, second) if g1 > g2 else (second, first)
        rows.append({"prompt": f"about {topic}:", "chosen": chosen, "rejected": rejected})
    return rows


def _answer(rng: random.Random, topic: str) -> str:
    words = [rng.choice(GOOD_WORDS + BAD_WORDS) for _ in range(rng.randint(1, 3))]
    return f" {topic} is {' '.join(words)}."


# ----------------------------------------------------------------------------- RLHF / DPO demos


def topic_prompt(topic: str) -> str:
    return f"about {topic}:"


def demonstration_rows(n: int, *, seed: int = 0) -> list[dict]:
    """SFT rows `{prompt, completion}` whose answers draw good and bad words alike (gold 0 on average), so the
    SFT policy says either kind and the preferences have something to improve."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        rows.append({"prompt": topic_prompt(topic), "completion": _answer(rng, topic)})
    return rows


def gold_rewards(prompts: list, completions: list, **columns) -> list[float]:
    """`gold_reward` with the reward-function contract, so recipes can log it (weight 0) beside the proxy."""
    return [gold_reward(completion) for completion in completions]


def is_well_formed(completion: str) -> bool:
    """Whether a completion is an answer of the task's form, "<subject> is w1 .. wk." with every w a known word
    (the subject is not checked: the gold rule ignores it)."""
    _, sep, rest = completion.partition(" is ")
    words = rest.removesuffix(".").split(" ")
    return bool(sep) and rest.endswith(".") and all(w in GOOD_WORDS + BAD_WORDS for w in words)
