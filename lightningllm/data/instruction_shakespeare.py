"""Instructions built from the Shakespeare corpus whose answers are checked exactly on plays never trained on.

Plays set each speech under its speaker's tag on a line of its own (``Ber.``, ``FIRST WITCH.``). Two
questions are asked about a passage of two consecutive speeches, tags included, each speech cut to its first
line (so passages vary in length as the lines do):

- ``next``: "Who speaks next?": the tag of the speech that follows. Dialogue mostly alternates, so the
  answer is usually the first tag of the passage, but not always (a third speaker enters).
- ``speaker``: "Who says ...?" with the opening words of one of the two speeches: the tag above them.

Both answers are copied from the passage, so they generalise to plays whose characters were never seen,
and both rest on what next-token pretraining on the plays learns: where tags stand and how turns pass. (A
question such as "which play is this line from?" cannot be answered for a held-out play, whose title
was never seen.) The answer is the tag as written, period included.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from lightningllm.data.corpus import Document

TASKS = ("next", "speaker")
QUESTIONS = {"next": "Who speaks next?", "speaker": 'Who says "{quote}"?'}
_TAG = re.compile(r"^[A-Z][A-Za-z'\- ]{0,24}\.$")
_NOT_TAGS = ("ACT ", "SCENE", "Scene", "PERSONS", "THE END")
QUOTE_WORDS = 3


@dataclass(frozen=True)
class Speech:
    """One speech: its speaker's tag (``Ber.``) and its text lines joined by newlines."""

    tag: str
    text: str


def speeches(text: str) -> list[Speech]:
    """The speeches of a play, in order: a tag line after a blank line, then the lines up to the next blank one."""
    lines = text.replace("\r\n", "\n").split("\n")
    found: list[Speech] = []
    for i in range(1, len(lines) - 1):
        tag = lines[i].strip()
        if lines[i - 1].strip() or not _TAG.match(tag) or tag.startswith(_NOT_TAGS) or not lines[i + 1].strip():
            continue
        body = []
        for line in lines[i + 1 :]:
            if not line.strip():
                break
            body.append(line.strip())
        body = [line for line in body if not line.startswith("[")]  # stage directions
        if body:
            found.append(Speech(tag, "\n".join(body)))
    return found


def shakespeare_instructions(
    documents: list[Document], fits: Callable[[dict], bool], seed: int, passage_chars: int = 32
) -> list[dict]:
    """Instruction records ``{"instruction", "input", "output", "task"}`` from every play in ``documents``.

    Args:
        documents: plays (poems hold no speeches and give nothing).
        fits: whether a record fits the model's context once rendered and tokenised; a passage is shortened
            (speech texts cut at a line or word boundary) until it does, and dropped if it never does.
        seed: picks which of the two speeches the ``speaker`` question quotes.
        passage_chars: the most characters kept of each speech's first line.

    Returns:
        Records in corpus order, alternating tasks.
    """
    rng = random.Random(seed)
    records = []
    for document in documents:
        play = speeches(document.text)
        for i in range(2, len(play)):
            first, second = play[i - 2], play[i - 1]
            if first.tag == second.tag:
                continue
            task = TASKS[i % 2]
            record = _record(task, first, second, play[i], rng.random() < 0.5, passage_chars, fits)
            if record is not None:
                records.append(record)
    return records


def _record(
    task: str, first: Speech, second: Speech, following: Speech, quote_first: bool, limit: int, fits: Callable
) -> dict | None:
    quoted = first if quote_first else second
    quote = " ".join(quoted.text.split()[:QUOTE_WORDS])
    if task == "next":
        question, answer = QUESTIONS["next"], following.tag
    else:
        question, answer = QUESTIONS["speaker"].format(quote=quote), quoted.tag
    for chars in range(limit, QUOTE_WORDS * 4, -8):
        passage = f"{first.tag}\n{_cut(first.text, chars)}\n\n{second.tag}\n{_cut(second.text, chars)}"
        record = {"instruction": question, "input": passage, "output": answer, "task": task}
        if (task == "next" or quote in passage) and fits(record):
            return record
    return None


def _cut(text: str, chars: int) -> str:
    """The first line of ``text``, at most ``chars`` characters, ending at a word boundary when it must be cut."""
    text = text.split("\n", 1)[0]
    if len(text) <= chars:
        return text
    cut = text[:chars]
    return cut[: cut.rfind(" ")] if " " in cut else cut
