"""Play-vocabulary judge: the share of a response's words that a chosen play uses."""

from __future__ import annotations

import re

from lightningllm.data.corpus import SHAKESPEARE, load_corpus
from lightningllm.errors import ConfigError
from lightningllm.judges import PairRule
from lightningllm.registry import register

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


def words(text: str) -> list[str]:
    """Lower-cased words (letters, inner apostrophes kept: ``o'er``, ``'tis`` -> ``tis``), in order."""
    return _WORD.findall(text.lower())


@register("judge")
class PlayVocabularyJudge(PairRule):
    """The share of the response's words (counted with repeats) found in one play's vocabulary, in [0, 1].

    A reply in the idiom of *Hamlet* scores near 1 for ``play: hamlet``; a response without words scores 0.
    The prompt is not read.

    Args:
        play: the document's name in the corpus (``hamlet``, ``macbeth``; for a folder corpus, its file name,
            with or without ``.txt``).
        corpus: ``shakespeare`` (the built-in corpus) or a path (see :func:`lightningllm.data.corpus.load_corpus`).
        data_dir: the cache root of the built-in corpus.
    """

    def __init__(self, play: str, corpus: str = SHAKESPEARE, data_dir: str = ".cache/lightningllm") -> None:
        documents = {d.name.removesuffix(".txt"): d for d in load_corpus(corpus, data_dir)}
        name = play.removesuffix(".txt")
        if name not in documents:
            raise ConfigError(
                f"PlayVocabularyJudge play={play!r} is not a document of the corpus {corpus!r}. Its documents: "
                f"{', '.join(sorted(documents))}."
            )
        self.play, self.vocabulary = name, frozenset(words(documents[name].text))

    def score_one(self, prompt: str, response: str) -> float:
        found = words(response)
        return sum(word in self.vocabulary for word in found) / len(found) if found else 0.0
