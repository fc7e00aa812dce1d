"""Shared code of the HF ``tokenizers`` tokenizers (no plugin here; see byte_level_bpe.py, bpe.py, word_piece.py)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.trainers import Trainer

from lightningllm.errors import TokenizerError
from lightningllm.tokenizer import SPECIAL_TOKENS, TextStream, Tokenizer

JSON_FILE = "tokenizer.json"


class TokenizersBackend(Tokenizer):
    """A tokenizer backed by a ``tokenizers.Tokenizer`` pipeline (``self._tok``), stored as ``tokenizer.json``.

    Encoding adds nothing around the ids (no post-processor); decoding writes special tokens back as
    text. Subclasses decide where the pipeline comes from and check it in :meth:`_load_file`.
    """

    _tok: HFTokenizer | None = None

    @property
    def vocab_size(self) -> int:
        self._require_trained()
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def is_trained(self) -> bool:
        return self._tok is not None

    @property
    def backend(self) -> HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        self._require_trained()
        return self._tok

    def token_to_id(self, token: str) -> int:
        self._require_trained()
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"Token {token!r} is not in the {type(self).__name__} vocabulary.")
        return token_id

    def encode(self, text: str) -> list[int]:
        self._require_trained()
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=False)

    def _save_files(self, directory: Path) -> None:
        self._tok.save(str(directory / JSON_FILE))

    def _load_files(self, directory: Path) -> None:
        self._load_file(self._resolve_file(directory, JSON_FILE))

    def _load_file(self, file: Path) -> None:
        """Read ``file`` (:meth:`_read_file`), check it fits this class and set ``self._tok``."""
        raise NotImplementedError

    def _read_file(self, file: Path) -> HFTokenizer:
        try:
            return HFTokenizer.from_file(str(file))
        except Exception as err:  # noqa: BLE001 - the Rust side raises a bare Exception
            raise TokenizerError(
                f"{type(self).__name__} cannot load {str(file)!r}: it is not a tokenizers JSON file ({err})."
            ) from None


class HFTokenizersTokenizer(TokenizersBackend):
    """A ``tokenizers.Tokenizer`` pipeline trained from an iterator, special tokens at ids 0..4.

    Subclasses build the untrained pipeline (:meth:`_pipeline`), the trainer (:meth:`_trainer`) and
    say what a loaded ``tokenizer.json`` must look like (:meth:`_pipeline_problem`). The special
    tokens are added tokens, so their text in an input (``"<eos>"``) encodes to their id, and
    :meth:`decode` writes them back as text; nothing is added around the ids (no post-processor).
    """

    min_vocab_size: int = len(SPECIAL_TOKENS) + 1
    default_vocab_size: int = 8000

    def __init__(self, vocab_size: int | None = None, path: str | None = None, min_frequency: int = 2) -> None:
        super().__init__(vocab_size=vocab_size, path=path)
        self._check_vocab_size(vocab_size, self.min_vocab_size)
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 0:
            raise TokenizerError(
                f"min_frequency={min_frequency!r} is not allowed: it is the count a pair needs to be merged "
                "and must be an integer >= 0."
            )
        self.min_frequency = min_frequency
        self._tok: HFTokenizer | None = None
        if path is not None:
            self._load_file(self._resolve_file(path, JSON_FILE))

    # --- to implement -------------------------------------------------------------
    def _pipeline(self) -> HFTokenizer:
        """The untrained tokenizer: model, normaliser, pre-tokenizer and decoder."""
        raise NotImplementedError

    def _trainer(self, vocab_size: int) -> Trainer:
        """The trainer, given ``special_tokens=list(SPECIAL_TOKENS)`` so they take ids 0..4."""
        raise NotImplementedError

    def _pipeline_problem(self, tok: HFTokenizer) -> str | None:
        """What is wrong with a loaded pipeline for this class, or None."""
        raise NotImplementedError

    # --- Tokenizer ---------------------------------------------------------------------
    def init_args(self) -> dict:
        return {"vocab_size": self.target_vocab_size, "min_frequency": self.min_frequency}

    def train(self, texts: Iterable[str], vocab_size: int | None = None) -> None:
        """Train on ``texts``.

        Args:
            texts: training texts.
            vocab_size: the largest vocabulary wanted (fewer tokens when the texts run out of merges);
                overrides the constructor's value. None: the class's ``default_vocab_size``.
        """
        if vocab_size is not None:
            self.target_vocab_size = self._check_vocab_size(vocab_size, self.min_vocab_size)
        size = self.target_vocab_size or self.default_vocab_size
        stream = TextStream(texts, type(self).__name__)
        tok = self._pipeline()
        tok.train_from_iterator(stream, trainer=self._trainer(size))
        stream.check_not_empty()
        if tok.get_vocab_size(with_added_tokens=True) > size:
            raise TokenizerError(
                f"vocab_size={size} is too small for {type(self).__name__} on these texts: the "
                f"{len(SPECIAL_TOKENS)} special tokens and the alphabet of the texts already take "
                f"{tok.get_vocab_size(with_added_tokens=True)} ids. Pass vocab_size >= "
                f"{tok.get_vocab_size(with_added_tokens=True)}."
            )
        self._set_tokenizer(tok, "the trained tokenizer")

    def _set_tokenizer(self, tok: HFTokenizer, source: str) -> None:
        name = type(self).__name__
        wrong = [(i, t) for i, t in enumerate(SPECIAL_TOKENS) if tok.token_to_id(t) != i]
        if wrong:
            raise TokenizerError(
                f"{name} cannot use {source}: it needs the special tokens {' '.join(SPECIAL_TOKENS)} at ids "
                f"0..{len(SPECIAL_TOKENS) - 1}, but {wrong[0][1]} has id {tok.token_to_id(wrong[0][1])}. "
                f"Train it with {name}.train or load a file written by {name}.save."
            )
        self._tok = tok

    def _load_file(self, file: Path) -> None:
        name = type(self).__name__
        tok = self._read_file(file)
        problem = self._pipeline_problem(tok)
        if problem:
            raise TokenizerError(
                f"{name} cannot load {str(file)!r}: {problem}. Load it with the tokenizer class that saved it."
            )
        self._set_tokenizer(tok, repr(str(file)))


def component_name(component: object) -> str:
    """The class name of a pipeline component (``"None"`` when absent)."""
    return type(component).__name__ if component is not None else "None"
