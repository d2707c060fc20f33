"""Language-consistency reward: the share of the completion's letters written in the target script.

DeepSeek-R1 (DeepSeek-AI 2025, sec. 2.3.3) rewards the proportion of target-language words in the
chain of thought to stop language mixing. Here the unit is the letter (Unicode category L*), and
its script comes from its Unicode name (`LATIN SMALL LETTER A`, `CJK UNIFIED IDEOGRAPH-4E2D`, ...).
Digits, punctuation, spaces and combining marks do not count. No letters at all scores 0.0.
"""

from __future__ import annotations

import functools
import unicodedata
from typing import Sequence

from tether.rewards.base import as_text

# script -> the Unicode name prefixes of its letters (the first word(s) of unicodedata.name)
_SCRIPTS: dict[str, tuple[str, ...]] = {
    "latin": ("LATIN", "FULLWIDTH LATIN"),
    "cyrillic": ("CYRILLIC",),
    "greek": ("GREEK",),
    "arabic": ("ARABIC",),
    "hebrew": ("HEBREW",),
    "devanagari": ("DEVANAGARI",),
    "thai": ("THAI",),
    "han": ("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH"),
    "hiragana": ("HIRAGANA",),
    "katakana": ("KATAKANA", "HALFWIDTH KATAKANA"),
    "hangul": ("HANGUL", "HALFWIDTH HANGUL"),
}
# unions and language codes, for convenience
_ALIASES: dict[str, tuple[str, ...]] = {
    "cjk": ("han", "hiragana", "katakana", "hangul"),
    "japanese": ("han", "hiragana", "katakana"),
    "en": ("latin",),
    "fr": ("latin",),
    "de": ("latin",),
    "es": ("latin",),
    "ru": ("cyrillic",),
    "zh": ("han",),
    "ja": ("han", "hiragana", "katakana"),
    "ko": ("hangul",),
    "ar": ("arabic",),
    "he": ("hebrew",),
    "hi": ("devanagari",),
    "el": ("greek",),
    "th": ("thai",),
}
SCRIPT_NAMES = tuple(sorted([*_SCRIPTS, *_ALIASES]))


@functools.lru_cache(maxsize=65536)
def letter_script(char: str) -> str | None:
    """The script of a letter (`latin`, `han`, ...); `other` for another script; None for a non-letter."""
    if not char.isalpha():
        return None
    if char.isascii():
        return "latin"
    name = unicodedata.name(char, "")
    for script, prefixes in _SCRIPTS.items():
        if name.startswith(prefixes):
            return script
    return "other"


def script_share(text: str, scripts: frozenset[str]) -> float:
    """Fraction of the letters in `text` whose script is in `scripts`; 0.0 when there are none."""
    letters = in_script = 0
    for char in text:
        script = letter_script(char)
        if script is not None:
            letters += 1
            in_script += script in scripts
    return in_script / letters if letters else 0.0


def _resolve_scripts(script: str | Sequence[str]) -> frozenset[str]:
    names = [script] if isinstance(script, str) else list(script)
    resolved: set[str] = set()
    for name in names:
        key = name.lower()
        if key in _SCRIPTS:
            resolved.add(key)
        elif key in _ALIASES:
            resolved.update(_ALIASES[key])
        else:
            raise ValueError(f"language reward: unknown script {name!r}; choose from {', '.join(SCRIPT_NAMES)}")
    return frozenset(resolved)


def make_language_reward(script: str | Sequence[str] = "latin"):
    """Build the `language` reward.

    Args:
        script: the target script, a language code that maps to one (`en`, `zh`, `ja`, ...), `cjk`
            (han + kana + hangul), or a list of these (their union).
    """
    scripts = _resolve_scripts(script)

    def language_reward(prompts: Sequence, completions: Sequence, **columns) -> list[float]:
        return [script_share(as_text(completion), scripts) for completion in completions]

    language_reward.__name__ = "language"
    return language_reward
