"""Character-level tokenizer: one id per Unicode character."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from lightningllm.errors import TokenizerError
from lightningllm.registry import register
from lightningllm.tokenizer import SPECIAL_TOKENS, TextStream, Tokenizer

VOCAB_FILE = "vocab.json"


@register("tokenizer")
class CharTokenizer(Tokenizer):
    """One token per character, as in char-RNN language models (Karpathy, 2015; nanoGPT's shakespeare_char).

    The vocabulary is the five special tokens (ids 0..4: ``<pad> <unk> <bos> <eos> <mask>``)
    followed by the distinct characters of the training texts in code-point order. A character
    that was not kept encodes to ``<unk>``, so ``decode(encode(text)) == text`` holds exactly when
    every character of ``text`` is in the vocabulary (``lossless`` is False: not for every text).
    Special tokens in a text are not matched: ``"<eos>"`` encodes as five characters. Decoding a
    special id writes its name (``<eos>``).

    Args:
        vocab_size: a cap on the vocabulary size: only the ``vocab_size - 5`` most frequent characters
            are kept (ties go to the lower code point). None keeps every character seen.
        path: a folder written by :meth:`save`, or a ``vocab.json`` file, to load instead of training.
    """

    lossless = False

    def __init__(self, vocab_size: int | None = None, path: str | None = None) -> None:
        super().__init__(vocab_size=vocab_size, path=path)
        self._check_vocab_size(vocab_size, len(SPECIAL_TOKENS) + 1)
        self._tokens: list[str] = []
        self._ids: dict[str, int] = {}
        if path is not None:
            self._load_file(self._resolve_file(path, VOCAB_FILE))

    @property
    def vocab_size(self) -> int:
        self._require_trained()
        return len(self._tokens)

    @property
    def is_trained(self) -> bool:
        return bool(self._tokens)

    def token_to_id(self, token: str) -> int:
        self._require_trained()
        if token not in self._ids:
            raise TokenizerError(f"Token {token!r} is not in the CharTokenizer vocabulary ({self.vocab_size} tokens).")
        return self._ids[token]

    def encode(self, text: str) -> list[int]:
        """Map each character to its id (``<unk>`` for a character not in the vocabulary)."""
        self._require_trained()
        unk = self._ids["<unk>"]
        return [self._ids.get(char, unk) for char in text]

    def decode(self, ids: Sequence[int]) -> str:
        """Join the characters of ``ids``; special ids are written as their names."""
        return "".join(self._tokens[i] for i in self._check_ids(ids))

    def train(self, texts: Iterable[str], vocab_size: int | None = None) -> None:
        """Build the vocabulary from the characters of ``texts``.

        Args:
            texts: training texts.
            vocab_size: overrides the constructor's cap for this and later saves.
        """
        if vocab_size is not None:
            self.target_vocab_size = self._check_vocab_size(vocab_size, len(SPECIAL_TOKENS) + 1)
        stream = TextStream(texts, type(self).__name__)
        counts: Counter[str] = Counter()
        for text in stream:
            counts.update(text)
        stream.check_not_empty()
        chars = sorted(counts, key=lambda c: (-counts[c], c))
        if self.target_vocab_size is not None:
            chars = chars[: self.target_vocab_size - len(SPECIAL_TOKENS)]
        self._set_tokens(list(SPECIAL_TOKENS) + sorted(chars))

    def _set_tokens(self, tokens: list[str]) -> None:
        self._tokens = tokens
        self._ids = {token: i for i, token in enumerate(tokens)}

    def _save_files(self, directory: Path) -> None:
        (directory / VOCAB_FILE).write_text(json.dumps(self._tokens, ensure_ascii=True) + "\n")

    def _load_files(self, directory: Path) -> None:
        self._load_file(self._resolve_file(directory, VOCAB_FILE))

    def _load_file(self, file: Path) -> None:
        try:
            tokens = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise TokenizerError(f"CharTokenizer cannot read {str(file)!r}: it is not valid JSON ({err}).") from None
        n = len(SPECIAL_TOKENS)
        if (
            not isinstance(tokens, list)
            or tuple(tokens[:n]) != SPECIAL_TOKENS
            or not all(isinstance(t, str) and len(t) == 1 for t in tokens[n:])
            or len(set(tokens)) != len(tokens)
        ):
            raise TokenizerError(
                f"{str(file)!r} is not a CharTokenizer vocabulary: expected a JSON list of the special tokens "
                f"{list(SPECIAL_TOKENS)} followed by distinct single characters, as written by save()."
            )
        self._set_tokens(tokens)
