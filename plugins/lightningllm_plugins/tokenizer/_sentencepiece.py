"""Shared code of the SentencePiece tokenizers (no plugin here; see sentencepiece_bpe.py, sentencepiece_unigram.py)."""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from lightningllm.errors import TokenizerError
from lightningllm.tokenizer import SPECIAL_TOKENS, TextStream, Tokenizer

MODEL_FILE = "tokenizer.model"
SPACE_SYMBOL = "\u2581"  # sentencepiece writes a space as "▁" and decodes every "▁" back to a space
N_BYTES = 256  # byte-fallback pieces <0x00>..<0xFF>
MIN_VOCAB = len(SPECIAL_TOKENS) + N_BYTES + 1


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model trained in memory, set up so that ``decode(encode(text)) == text``.

    Training options: identity normalisation, no extra-whitespace removal, no dummy prefix and
    byte fallback, so every character survives: one the vocabulary lacks is spelled as its UTF-8
    bytes. Newlines, tabs and runs of spaces round-trip. Special ids are fixed: ``<pad>`` 0,
    ``<unk>`` 1, ``<bos>`` 2, ``<eos>`` 3 (sentencepiece control symbols) and ``<mask>`` 4 (a user
    symbol, so ``"<mask>"`` in a text encodes to ``mask_id``).

    The one character sentencepiece alone cannot round-trip is ``"▁"`` (U+2581), its own space mark:
    it decodes as a space. :meth:`encode` therefore spells each ``"▁"`` of the text as its three
    byte pieces, which decode back to ``"▁"``. On texts without ``"▁"`` :meth:`encode` equals
    ``SentencePieceProcessor.encode`` on the saved model. :meth:`decode` writes the control ids
    (pad, unk, bos, eos) as their names rather than dropping them. Saved as ``tokenizer.model``,
    readable by ``sentencepiece.SentencePieceProcessor``.

    Not registered: the plugins are its subclasses, which set ``model_type`` and inherit these
    arguments (jsonargparse reads their ``--help`` from this docstring).

    Args:
        vocab_size: the largest vocabulary :meth:`train` builds, at least 262 (5 special tokens,
            256 byte pieces, one character); None: 8000.
        path: a folder written by :meth:`save`, or a ``.model`` file, to load instead of training.
        character_coverage: fraction of the training characters that get their own piece; the rest
            are spelled in bytes.
        split_digits: split numbers into single digits.
        max_sentence_length: training lines longer than this many bytes are skipped.
        num_threads: threads used for training.
    """

    lossless = True
    model_type: str = ""  # "bpe" or "unigram", set by the subclass

    def __init__(
        self,
        vocab_size: int | None = None,
        path: str | None = None,
        character_coverage: float = 0.9995,
        split_digits: bool = False,
        max_sentence_length: int = 1 << 16,
        num_threads: int = 4,
    ) -> None:
        super().__init__(vocab_size=vocab_size, path=path)
        self._check_vocab_size(vocab_size, MIN_VOCAB)
        if not 0.0 < character_coverage <= 1.0:
            raise TokenizerError(
                f"character_coverage={character_coverage!r} is not allowed: it is the fraction of characters "
                "that get their own piece and must lie in (0, 1]."
            )
        self.character_coverage = character_coverage
        self.split_digits = split_digits
        self.max_sentence_length = max_sentence_length
        self.num_threads = num_threads
        self._sp: spm.SentencePieceProcessor | None = None
        self._proto = b""
        if path is not None:
            self._load_file(self._resolve_file(path, MODEL_FILE))

    def init_args(self) -> dict:
        return {
            "vocab_size": self.target_vocab_size,
            "character_coverage": self.character_coverage,
            "split_digits": self.split_digits,
            "max_sentence_length": self.max_sentence_length,
            "num_threads": self.num_threads,
        }

    @property
    def vocab_size(self) -> int:
        self._require_trained()
        return self._sp.get_piece_size()

    @property
    def is_trained(self) -> bool:
        return self._sp is not None

    def token_to_id(self, token: str) -> int:
        self._require_trained()
        token_id = self._sp.piece_to_id(token)
        if self._sp.id_to_piece(token_id) != token:
            raise TokenizerError(f"Token {token!r} is not in the {type(self).__name__} vocabulary.")
        return token_id

    def encode(self, text: str) -> list[int]:
        """Encode ``text``; each ``"▁"`` becomes its byte pieces so that it decodes to itself."""
        self._require_trained()
        parts = text.split(SPACE_SYMBOL)
        ids = self._sp.encode(parts[0])
        for part in parts[1:]:
            ids.extend(self._space_symbol_ids)
            ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ``ids``; the control ids (pad, unk, bos, eos) are written as their names."""
        ids = self._check_ids(ids)
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._control_ids:
                out.append(self._sp.decode(run))
                out.append(self._control_ids[i])
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def train(self, texts: Iterable[str], vocab_size: int | None = None) -> None:
        """Train on ``texts`` (split into lines, each keeping its newline).

        Args:
            texts: training texts.
            vocab_size: the largest vocabulary wanted (fewer pieces when the texts run out of merges);
                overrides the constructor's value. None: 8000.
        """
        if vocab_size is not None:
            self.target_vocab_size = self._check_vocab_size(vocab_size, MIN_VOCAB)
        size = self.target_vocab_size or 8000
        stream = TextStream(texts, type(self).__name__)
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_lines(stream),
                model_writer=model,
                model_type=self.model_type,
                vocab_size=size,
                hard_vocab_limit=False,
                character_coverage=self.character_coverage,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                byte_fallback=True,
                split_digits=self.split_digits,
                allow_whitespace_only_pieces=True,
                max_sentence_length=self.max_sentence_length,
                pad_id=0,
                unk_id=1,
                bos_id=2,
                eos_id=3,
                pad_piece=SPECIAL_TOKENS[0],
                unk_piece=SPECIAL_TOKENS[1],
                bos_piece=SPECIAL_TOKENS[2],
                eos_piece=SPECIAL_TOKENS[3],
                user_defined_symbols=list(SPECIAL_TOKENS[4:]),
                num_threads=self.num_threads,
                minloglevel=2,
            )
        except RuntimeError as err:
            stream.check_not_empty()
            raise self._training_error(str(err), size) from None
        stream.check_not_empty()
        self._set_model(model.getvalue(), "the trained model")

    def _training_error(self, message: str, size: int) -> TokenizerError:
        name = type(self).__name__
        found = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
        if found:
            return TokenizerError(
                f"vocab_size={size} is too small for {name}: the {len(SPECIAL_TOKENS)} special tokens, "
                f"{N_BYTES} byte-fallback pieces and the characters kept by character_coverage="
                f"{self.character_coverage} need at least {found.group(2)}. Pass vocab_size >= {found.group(2)} "
                "or a lower character_coverage."
            )
        return TokenizerError(f"sentencepiece could not train {name} with vocab_size={size}: {message}")

    def _set_model(self, proto: bytes, source: str) -> None:
        name = type(self).__name__
        try:
            sp = spm.SentencePieceProcessor(model_proto=proto)
        except (RuntimeError, OSError, TypeError) as err:
            raise TokenizerError(
                f"{name} cannot load {source}: it is not a sentencepiece model file ({err})."
            ) from None
        missing = [t for i, t in enumerate(SPECIAL_TOKENS) if sp.get_piece_size() <= i or sp.id_to_piece(i) != t]
        if missing or not sp.is_byte(sp.piece_to_id("<0x00>")):
            raise TokenizerError(
                f"{name} cannot use {source}: it needs the special tokens {' '.join(SPECIAL_TOKENS)} at ids "
                f"0..{len(SPECIAL_TOKENS) - 1} and byte-fallback pieces; "
                f"{'missing: ' + ' '.join(missing) if missing else 'it has no byte pieces'}. "
                f"Train it with {name}.train or load a file written by {name}.save."
            )
        self._sp = sp
        self._proto = proto
        self._space_symbol_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_SYMBOL.encode()]
        self._control_ids = {i: SPECIAL_TOKENS[i] for i in range(4)}

    def _save_files(self, directory: Path) -> None:
        (directory / MODEL_FILE).write_bytes(self._proto)

    def _load_files(self, directory: Path) -> None:
        self._load_file(self._resolve_file(directory, MODEL_FILE))

    def _load_file(self, file: Path) -> None:
        self._set_model(file.read_bytes(), repr(str(file)))


def _lines(texts: Iterable[str]) -> Iterator[str]:
    """Split texts into lines that keep their ``"\\n"``, so pieces can learn newlines."""
    for text in texts:
        lines = text.split("\n")
        for line in lines[:-1]:
            yield line + "\n"
        if lines[-1]:
            yield lines[-1]
