"""Meter judge: lines that scan closer to ten syllables (Shakespeare's iambic pentameter) score higher."""

from __future__ import annotations

import re

from lightningllm.errors import ConfigError
from lightningllm.judges import PairRule
from lightningllm.registry import register

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")
_VOWEL_GROUP = re.compile(r"[aeiouy]+")


def syllables(word: str) -> int:
    """An English spelling heuristic: vowel groups (y counts), less a silent final ``e`` or ``-ed``; at least 1.

    ``compare`` 2, ``summer's`` 2, ``question`` 2, ``loved`` 1, ``wanted`` 2, ``table`` 2, ``whale`` 1. Words the rule
    misreads (``fire``, ``poem``) are off by one; lines average such errors out.
    """
    word = word.lower().replace("'", "")
    count = len(_VOWEL_GROUP.findall(word))
    sounded_le = word.endswith("le") and len(word) > 2 and word[-3] not in "aeiouy"  # table, little
    silent_e = word.endswith("e") and not word.endswith("ee") and not sounded_le
    silent_ed = word.endswith("ed") and not word.endswith(("ted", "ded"))
    if count > 1 and (silent_e or silent_ed):
        count -= 1
    return max(count, 1)


def line_syllables(line: str) -> int:
    """The syllables of a line of verse: the sum over its words."""
    return sum(syllables(word) for word in _WORD.findall(line.lower()))


@register("judge")
class MeterJudge(PairRule):
    """Minus the mean distance of a response's lines from ``target`` syllables (ten: iambic pentameter).

    Each non-blank line of the response is counted with :func:`syllables`; a response without words scores
    ``-target`` (as a line of none). The prompt is not read.

    Args:
        target: the syllables a line should have.
    """

    def __init__(self, target: int = 10) -> None:
        if isinstance(target, bool) or not isinstance(target, int) or target < 1:
            raise ConfigError(f"MeterJudge target={target!r} must be a positive number of syllables per line.")
        self.target = target

    def score_one(self, prompt: str, response: str) -> float:
        counts = [line_syllables(line) for line in response.splitlines() if _WORD.search(line.lower())]
        if not counts:
            return -float(self.target)
        return -sum(abs(n - self.target) for n in counts) / len(counts)
