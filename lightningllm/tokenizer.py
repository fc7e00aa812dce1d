"""The tokenizer contract and loading a saved tokenizer by its recorded class."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from lightningllm.errors import TokenizerError

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", "<mask>")
META_FILE = "tokenizer_config.json"


class TextStream:
    """Iterate over training texts once, checking each is a ``str`` and counting characters.

    Args:
        texts: the training texts (any iterable, consumed once).
        owner: the tokenizer class name, for error messages.
    """

    def __init__(self, texts: Iterable[str], owner: str) -> None:
        if isinstance(texts, str):
            texts = [texts]
        self.texts = texts
        self.owner = owner
        self.n_chars = 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            if not isinstance(text, str):
                raise TokenizerError(
                    f"{self.owner}.train got a {type(text).__name__} where a str was expected: "
                    "texts must be an iterable of strings."
                )
            self.n_chars += len(text)
            yield text

    def check_not_empty(self) -> None:
        """Raise :class:`TokenizerError` if the texts held no characters at all."""
        if self.n_chars == 0:
            raise TokenizerError(
                f"{self.owner}.train got no text: the texts were empty. Pass a non-empty iterable of strings."
            )


class Tokenizer:
    """Text <-> token ids. Plugins register under kind ``tokenizer``.

    Special tokens ``<pad> <unk> <bos> <eos> <mask>`` always exist, with ids
    ``pad_id unk_id bos_id eos_id mask_id``.

    Subclasses implement :meth:`encode`, :meth:`decode`, :meth:`train`,
    :meth:`_save_files`, :meth:`_load_files` and :attr:`vocab_size`, and set
    ``lossless`` to say whether ``decode(encode(text)) == text`` for every text.

    Args:
        vocab_size: the vocabulary size :meth:`train` aims for (None: the plugin's own rule).
        path: an existing tokenizer file or folder to load instead of training.
    """

    lossless: bool = True

    def __init__(self, vocab_size: int | None = None, path: str | None = None) -> None:
        self.target_vocab_size = vocab_size
        self.path = path

    # --- to implement -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def is_trained(self) -> bool:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def train(self, texts: Iterable[str], vocab_size: int | None = None) -> None:
        raise NotImplementedError

    def _save_files(self, directory: Path) -> None:
        raise NotImplementedError

    def _load_files(self, directory: Path) -> None:
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return self.token_to_id("<pad>")

    @property
    def unk_id(self) -> int:
        return self.token_to_id("<unk>")

    @property
    def bos_id(self) -> int:
        return self.token_to_id("<bos>")

    @property
    def eos_id(self) -> int:
        return self.token_to_id("<eos>")

    @property
    def mask_id(self) -> int:
        return self.token_to_id("<mask>")

    def init_args(self) -> dict:
        """Constructor arguments recorded beside the files (override to add knobs)."""
        return {"vocab_size": self.target_vocab_size}

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer's files and ``tokenizer_config.json`` into ``directory``."""
        if not self.is_trained:
            raise TokenizerError(f"{type(self).__name__} has not been trained or loaded, so it cannot be saved.")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        before = set(os.listdir(directory))
        self._save_files(directory)
        written = sorted(set(os.listdir(directory)) - before)  # lets a later export recognise these files as ours
        meta = {"class_path": type(self).__name__, "init_args": self.init_args(), "vocab_size": self.vocab_size}
        meta["files"] = written
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer saved by :meth:`save`, whatever its class."""
        from lightningllm.registry import get  # the registry imports plugins lazily

        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise TokenizerError(f"No tokenizer in {str(directory)!r}: {META_FILE} is missing.")
        try:
            meta = json.loads(meta_path.read_text())
            class_path = meta["class_path"]
        except (ValueError, KeyError, TypeError) as err:
            raise TokenizerError(
                f"{str(meta_path)!r} is not a tokenizer config: expected a JSON object with a 'class_path' "
                f"key as written by Tokenizer.save ({type(err).__name__}: {err})."
            ) from None
        tokenizer_cls = get("tokenizer", class_path)
        tokenizer = tokenizer_cls(**meta.get("init_args", {}))
        tokenizer._load_files(directory)
        return tokenizer

    # --- helpers for plugins ----------------------------------------------------------
    def _require_trained(self) -> None:
        """Raise :class:`TokenizerError` unless the tokenizer has a vocabulary."""
        if not self.is_trained:
            raise TokenizerError(
                f"{type(self).__name__} has not been trained or loaded, so it cannot encode or decode. "
                f"Call train(texts) first, or pass path= an existing tokenizer file or folder."
            )

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        """Return ``ids`` as a list, raising :class:`TokenizerError` on an id outside ``[0, vocab_size)``."""
        self._require_trained()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(
                f"Token id {bad[0]} is out of range for {type(self).__name__}: ids run from 0 to "
                f"{self.vocab_size - 1} (vocab_size={self.vocab_size})."
            )
        return ids

    def _check_vocab_size(self, vocab_size: int | None, minimum: int) -> int | None:
        """Validate a requested vocabulary size (None passes through)."""
        if vocab_size is None:
            return None
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
            raise TokenizerError(
                f"vocab_size={vocab_size!r} is too small for {type(self).__name__}: it must be an integer "
                f">= {minimum} to hold the {len(SPECIAL_TOKENS)} special tokens {' '.join(SPECIAL_TOKENS)} "
                f"and the base alphabet."
            )
        return vocab_size

    def _resolve_file(self, path: str | os.PathLike, filename: str) -> Path:
        """The tokenizer file that ``path`` names: ``path`` itself, or ``path/filename`` for a folder."""
        resolved = Path(path)
        if resolved.is_dir():
            resolved = resolved / filename
        if not resolved.is_file():
            raise TokenizerError(
                f"{type(self).__name__} cannot load path={str(path)!r}: no such file. Pass a folder that holds "
                f"{filename!r} (as written by save()) or the {filename!r} file itself."
            )
        return resolved


def saved_files(directory: str | os.PathLike) -> frozenset[str]:
    """The names of the files a tokenizer saved into ``directory`` (its config and what the config lists).

    Folders written before ``tokenizer_config.json`` listed its files hold one of the built-in plugins' files.
    """
    try:
        listed = json.loads((Path(directory) / META_FILE).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    if not isinstance(listed, list) or not all(isinstance(name, str) and "/" not in name for name in listed):
        listed = []
    return frozenset({META_FILE, *LEGACY_FILES, *listed})


LEGACY_FILES = ("vocab.json", "tokenizer.json", "tokenizer.model")
