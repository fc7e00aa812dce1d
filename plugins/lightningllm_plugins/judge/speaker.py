"""Speaker judge: replies to the bundled Shakespeare questions, checked against the passage they quote."""

from __future__ import annotations

import re

from lightningllm.data.instruction_shakespeare import speeches
from lightningllm.judges import PairRule
from lightningllm.registry import register

_WHO_SAYS = re.compile(r'^Who says "(.+)"\?$')


@register("judge")
class SpeakerJudge(PairRule):
    """Scores a reply to a question of :mod:`~lightningllm.data.instruction_shakespeare` from its passage alone.

    The prompt is the question, a blank line, then the passage (as ``lightningllm label --prompts shakespeare``
    writes it). ``Who says "..."?``: 1 for the tag above the quoted words (the right answer), 0.5 for the
    passage's other tag. ``Who speaks next?``: 1 for the passage's first tag (dialogue alternates, so the
    speaker before the last one speaks again: the right answer for most passages, not all), 0.5 for its other
    tag. Anything else, or a prompt that is not such a question, scores 0.
    """

    def score_one(self, prompt: str, response: str) -> float:
        question, _, passage = prompt.partition("\n\n")
        found = speeches(f"\n{passage}\n\n")
        tags = [speech.tag for speech in found]
        reply = response.strip()
        if reply not in tags:
            return 0.0
        quoted = _WHO_SAYS.match(question.strip())
        if quoted:
            right = next((s.tag for s in found if s.text.startswith(quoted.group(1))), None)
        else:
            right = tags[0] if question.strip() == "Who speaks next?" else None
        return 1.0 if reply == right else 0.5 if right is not None else 0.0
