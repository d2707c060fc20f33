"""Format reward: does the completion follow the DeepSeek-R1-Zero template?

    <think> reasoning </think> <answer> answer </answer>

(DeepSeek-AI 2025, Table 1.) The whole completion must be the template, surrounding whitespace
ignored, each of the four tags exactly once. `strict` mode scores 1.0 or 0.0; `partial` mode gives
0.25 per tag that appears exactly once (at most 0.75) and 1.0 only for the full template, a
denser signal early in training.
"""

from __future__ import annotations

import re
from typing import Sequence

from tether.rewards.base import as_text

FORMAT_MODES = ("strict", "partial")
PARTIAL_CREDIT_PER_TAG = 0.25  # four tags; a completion off-template can reach 0.75, never 1.0


def make_format_reward(
    think_tag: str = "think",
    answer_tag: str = "answer",
    mode: str = "strict",
    think_in_prompt: bool = False,
):
    """Build the `format` reward.

    Args:
        think_tag: name of the reasoning tag (`think` -> `<think>...</think>`).
        answer_tag: name of the answer tag.
        mode: `strict` (1.0 for the template, else 0.0) or `partial` (0.25 per tag present exactly once,
            capped at 0.75 off-template; 1.0 for the template).
        think_in_prompt: the prompt already ends with the opening `<think>` (as in the R1-Zero
            template), so the completion is read as if it began with it.
    """
    if mode not in FORMAT_MODES:
        raise ValueError(f"format reward: mode must be one of {FORMAT_MODES}, got {mode!r}")
    for option, tag in (("think_tag", think_tag), ("answer_tag", answer_tag)):
        if not tag or not re.fullmatch(r"[\w\-.:]+", tag):
            raise ValueError(f"format reward: {option} must be a tag name such as 'think', got {tag!r}")
    tags = [f"<{think_tag}>", f"</{think_tag}>", f"<{answer_tag}>", f"</{answer_tag}>"]
    think, answer = re.escape(think_tag), re.escape(answer_tag)
    template = re.compile(rf"\s*<{think}>.*?</{think}>\s*<{answer}>.*?</{answer}>\s*", flags=re.DOTALL)

    def score(completion: str) -> float:
        text = tags[0] + completion if think_in_prompt else completion
        once = [text.count(tag) == 1 for tag in tags]
        if all(once) and template.fullmatch(text):
            return 1.0
        if mode == "partial":
            return min(PARTIAL_CREDIT_PER_TAG * sum(once), 3 * PARTIAL_CREDIT_PER_TAG)
        return 0.0

    def format_reward(prompts: Sequence, completions: Sequence, **columns) -> list[float]:
        return [score(as_text(completion)) for completion in completions]

    format_reward.__name__ = "format"
    return format_reward
