"""The tokenizer contract and loading a saved tokenizer by its recorded class."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from lightningllm.errors import TokenizerError

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", "<mask>")
META_FILE = "tokenizer_config.json"


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
        self._save_files(directory)
        meta = {"class_path": type(self).__name__, "init_args": self.init_args(), "vocab_size": self.vocab_size}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer saved by :meth:`save`, whatever its class."""
        from lightningllm.registry import get  # the registry imports plugins lazily

        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise TokenizerError(f"No tokenizer in {str(directory)!r}: {META_FILE} is missing.")
        meta = json.loads(meta_path.read_text())
        tokenizer_cls = get("tokenizer", meta["class_path"])
        tokenizer = tokenizer_cls(**meta.get("init_args", {}))
        tokenizer._load_files(directory)
        return tokenizer
