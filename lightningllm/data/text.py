"""TextDataModule: a corpus, a tokenizer, and fixed-length next-token windows over cached token arrays."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightningllm.atomic import atomic_directory, atomic_file
from lightningllm.checks import check_int
from lightningllm.data.corpus import Document, corpus_fingerprint, load_corpus
from lightningllm.data.resumable import resumable_loader
from lightningllm.errors import ConfigError, DataError, TokenizerError
from lightningllm.hparams import save_hyperparameters
from lightningllm.tokenizer import META_FILE, Tokenizer

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the layout of <data_dir>/tokens/<key>/ changes
META = "meta.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val", "test")
SINGLE_DOCUMENT_TAIL = 0.1  # held out from a one-document corpus when val_documents is a count
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}


class TokenWindows(Dataset):
    """Windows of ``seq_len + 1`` tokens that start every ``stride`` tokens of a flat token file.

    Item ``i`` is ``{"input_ids": (T,), "labels": (T,)}`` (int64, ``T = seq_len``) taken from
    ``window = tokens[i * stride : i * stride + seq_len + 1]``: ``input_ids = window[:-1]`` and
    ``labels = window[1:]``. The file is memory-mapped on first access in each process, so every
    DataLoader worker opens its own map and nothing large is pickled.

    Args:
        path: the token file (raw little-endian integers of ``dtype``).
        dtype: numpy dtype name of the file, ``"uint16"`` or ``"uint32"``.
        n_tokens: number of tokens in the file.
        seq_len: tokens per sample (T).
        stride: tokens between the starts of consecutive windows.
    """

    def __init__(self, path: str | os.PathLike, dtype: str, n_tokens: int, seq_len: int, stride: int) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.n_tokens = n_tokens
        self.seq_len = seq_len
        self.stride = stride
        self._tokens: np.memmap | None = None

    def __len__(self) -> int:
        if self.n_tokens < self.seq_len + 1:
            return 0
        return (self.n_tokens - self.seq_len - 1) // self.stride + 1

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        start = index * self.stride
        window = torch.from_numpy(self._tokens[start : start + self.seq_len + 1].astype(np.int64))  # (T + 1,)
        return {"input_ids": window[:-1], "labels": window[1:]}  # (T,), (T,)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokens"] = None  # each worker maps the file itself
        return state


class TextDataModule(L.LightningDataModule):
    """Next-token windows over a text corpus, tokenised once and cached on disk.

    Validation (and test) hold out WHOLE documents (plays of the Shakespeare corpus, files of a
    folder), chosen by a shuffle of the sorted document names seeded with ``seed``, so no held-out
    text is seen in training, not even by the tokenizer, which trains on the training documents
    only. A corpus of a single document cannot be split by documents: then its tail is held out
    (the last ``val_documents`` fraction of its characters if that is a float, else the last
    10%), and validation text continues the training text.

    Each split is one token stream, the documents in corpus order with the tokenizer's EOS id
    after each. Samples are windows of ``seq_len + 1`` tokens starting every ``stride`` tokens;
    batches are ``{"input_ids": (B, T), "labels": (B, T)}`` int64 tensors with ``T = seq_len``
    and ``labels`` the inputs shifted by one. The training loader shuffles (a new order each epoch,
    seeded by ``seed`` and the epoch), drops the last incomplete batch, shards the order over the ranks
    under DDP/FSDP (rank ``r`` of ``W`` takes every ``W``-th sample, so ``W`` processes see the batches of
    one process with a ``W`` times larger batch) and resumes mid-epoch from a checkpoint
    (:mod:`lightningllm.data.resumable`); validation and test loaders keep order.

    Everything derived from the corpus is cached under
    ``<data_dir>/tokens/<TokenizerClass>-<key>/`` (``key`` hashes the corpus, the split and the
    tokenizer's class and arguments): the trained tokenizer (``tokenizer/``), ``train.bin``,
    ``val.bin`` (and ``test.bin`` when ``test_documents`` is set) as uint16 (uint32 when the
    vocabulary exceeds 65536) and ``meta.json``, which is written last. Every write goes to a
    temporary name beside its target and is renamed into place, so an interrupted run leaves no
    half-written file and the next run starts over; a complete cache is reused without
    tokenising again.

    Args:
        tokenizer: the tokenizer plugin; trained on the training documents unless it is already
            trained (or a cached one is found). Public as ``datamodule.tokenizer``.
        corpus: ``"shakespeare"`` (the built-in corpus, fetched once), a path to a UTF-8 text file
            or a path to a folder of ``*.txt`` files (one document each).
        data_dir: root of the corpus and token caches.
        seq_len: tokens per sample (T).
        stride: tokens between the starts of consecutive windows; None means ``seq_len``
            (non-overlapping windows). Smaller values overlap windows.
        batch_size: samples per batch (B).
        val_documents: documents held out for validation: a count (int >= 1) or a fraction of the
            documents in (0, 1), rounded, at least 1.
        test_documents: documents held out for testing, counted like ``val_documents`` and disjoint
            from them; None tests on the validation documents.
        num_workers: DataLoader worker processes (0 loads in the main process).
        seed: seed of the document holdout and of the training order.
        extra_ids: ids reserved above the tokenizer's vocabulary (T5's sentinels, for
            :class:`~lightningllm.tasks.span_corruption.SpanCorruption`): ``vocab_size``, which the CLI
            passes to the model, counts them; the token arrays never hold them.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        corpus: str = "shakespeare",
        data_dir: str = ".cache/lightningllm",
        seq_len: int = 256,
        stride: int | None = None,
        batch_size: int = 32,
        val_documents: int | float = 0.05,
        test_documents: int | float | None = None,
        num_workers: int = 0,
        seed: int = 1234,
        extra_ids: int = 0,
    ) -> None:
        super().__init__()
        _check_int("seq_len", seq_len, minimum=1)
        _check_int("extra_ids", extra_ids, minimum=0)
        if stride is not None:
            _check_int("stride", stride, minimum=1, extra="or null for non-overlapping windows (stride = seq_len)")
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("num_workers", num_workers, minimum=0)
        _check_int("seed", seed)
        _check_holdout("val_documents", val_documents)
        if test_documents is not None:
            _check_holdout("test_documents", test_documents)
        save_hyperparameters(self, injected=("tokenizer",))
        self.tokenizer = tokenizer
        self.corpus = corpus
        self.data_dir = Path(data_dir)
        self.seq_len = seq_len
        self.stride = seq_len if stride is None else stride
        self.batch_size = batch_size
        self.val_documents = val_documents
        self.test_documents = test_documents
        self.num_workers = num_workers
        self.seed = seed
        self.extra_ids = extra_ids
        self.datasets: dict[str, TokenWindows] = {}
        self._documents: list[Document] | None = None
        self._splits: dict[str, list[Document]] | None = None
        self._cache_dir: Path | None = None
        self._tokenizer_ready = False

    # --- what the CLI and tasks read ----------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size plus ``extra_ids``, training (or loading the cached) tokenizer first."""
        self._prepare_tokenizer()
        return self.tokenizer.vocab_size + self.extra_ids

    @property
    def cache_dir(self) -> Path:
        """``<data_dir>/tokens/<TokenizerClass>-<key>/``, where this corpus, split and tokenizer are cached."""
        if self._cache_dir is None:
            documents = self._load_documents()
            splits = self._split_documents()
            identity = {
                "format": CACHE_FORMAT,
                "corpus": corpus_fingerprint(documents),
                "splits": {name: [d.name for d in docs] for name, docs in splits.items()},
                "tokenizer": self._tokenizer_identity(),
            }
            key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
            self._cache_dir = self.data_dir / "tokens" / f"{type(self.tokenizer).__name__}-{key}"
        return self._cache_dir

    # --- LightningDataModule hooks -------------------------------------------------------------
    def prepare_data(self) -> None:
        """Fetch the corpus, train or load the tokenizer and write the token cache (once, on one process)."""
        self._build_token_cache()

    def setup(self, stage: str | None = None) -> None:
        """Open the token windows of the splits ``stage`` needs (all of them for None)."""
        meta = self._build_token_cache()  # a no-op when prepare_data already wrote it
        for split in _STAGE_SPLITS.get(stage or "", SPLITS):
            self.datasets[split] = self._windows(meta, split)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The validation windows, for ``lightningllm predict``."""
        return self._loader("val")

    # --- corpus and split ----------------------------------------------------------------------
    def _load_documents(self) -> list[Document]:
        if self._documents is None:
            self._documents = load_corpus(self.corpus, self.data_dir)
        return self._documents

    def _split_documents(self) -> dict[str, list[Document]]:
        if self._splits is not None:
            return self._splits
        documents = self._load_documents()
        if len(documents) == 1:
            self._splits = self._split_single_document(documents[0])
            return self._splits
        self._splits = split_by_document(documents, self.val_documents, self.test_documents, self.seed, self.corpus)
        return self._splits

    def _split_single_document(self, document: Document) -> dict[str, list[Document]]:
        if self.test_documents is not None:
            raise DataError(
                f"Corpus {self.corpus!r} is a single document, so test_documents={self.test_documents!r} cannot "
                "hold out a separate test document. Leave test_documents unset (test on the validation "
                "tail) or use a folder of several documents."
            )
        fraction = self.val_documents if isinstance(self.val_documents, float) else SINGLE_DOCUMENT_TAIL
        text = document.text
        if len(text) < 2:
            raise DataError(
                f"Corpus {self.corpus!r} is a single document of {len(text)} character(s), too short to hold out "
                "a validation tail. Use a longer text file or a folder of several documents."
            )
        cut = min(max(round(len(text) * (1 - fraction)), 1), len(text) - 1)
        log.info("Corpus %r is one document: holding out its last %d characters", self.corpus, len(text) - cut)
        train = [Document(f"{document.name}[:{cut}]", text[:cut])]
        val = [Document(f"{document.name}[{cut}:]", text[cut:])]
        return {"train": train, "val": val, "test": val}

    # --- tokenizer ---------------------------------------------------------------------------------
    def _tokenizer_identity(self) -> dict[str, Any]:
        tokenizer = self.tokenizer
        identity: dict[str, Any] = {"class_path": type(tokenizer).__name__, "init_args": tokenizer.init_args()}
        if tokenizer.is_trained:  # a tokenizer trained elsewhere: its files decide the tokens
            identity["vocab_size"] = tokenizer.vocab_size
            identity["files"] = _tokenizer_digest(tokenizer)
        return identity

    def _prepare_tokenizer(self) -> Path:
        cache = self.cache_dir  # keyed on the tokenizer's state before training
        if self._tokenizer_ready:
            return cache
        saved = cache / TOKENIZER_DIR
        if self.tokenizer.is_trained:
            if not (saved / META_FILE).is_file():
                with atomic_directory(saved) as staging:
                    self.tokenizer.save(staging)
        elif (saved / META_FILE).is_file():
            self.tokenizer._load_files(saved)
        else:
            train = self._split_documents()["train"]
            log.info("Training %s on %d training document(s)", type(self.tokenizer).__name__, len(train))
            self.tokenizer.train([d.text for d in train], getattr(self.tokenizer, "target_vocab_size", None))
            with atomic_directory(saved) as staging:
                self.tokenizer.save(staging)
            self.tokenizer._load_files(saved)  # the files that won, should another process have saved first
        self._tokenizer_ready = True
        return cache

    # --- token cache -------------------------------------------------------------------------------
    def _build_token_cache(self) -> dict[str, Any]:
        cache = self._prepare_tokenizer()
        meta_path = cache / META
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("vocab_size") != self.tokenizer.vocab_size:
                raise DataError(
                    f"The token cache {str(cache)!r} was written with vocab_size {meta.get('vocab_size')}, but the "
                    f"tokenizer has {self.tokenizer.vocab_size}. Delete that folder to tokenise again."
                )
            return meta
        splits = self._split_documents()
        vocab_size, eos_id = self.tokenizer.vocab_size, self.tokenizer.eos_id
        dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)  # ids are 0 .. vocab_size - 1
        files = {"train": "train.bin", "val": "val.bin"}
        if splits["test"] is not splits["val"]:
            files["test"] = "test.bin"
        log.info("Tokenising corpus %r into %s", self.corpus, cache)
        counts: dict[str, int] = {}
        with ExitStack() as staged:  # every split file appears, or none does
            for split, filename in files.items():
                with staged.enter_context(atomic_file(cache / filename)).open("wb") as handle:
                    counts[split] = self._write_tokens(splits[split], handle, dtype, vocab_size, eos_id)
        meta = {
            "format": CACHE_FORMAT,
            "corpus": self.corpus,
            "fingerprint": corpus_fingerprint(self._load_documents()),
            "tokenizer": type(self.tokenizer).__name__,
            "vocab_size": vocab_size,
            "eos_id": eos_id,
            "dtype": dtype.name,
            "splits": {
                split: {
                    "file": files.get(split, "val.bin"),
                    "tokens": counts.get(split, counts["val"]),
                    "documents": [d.name for d in splits[split]],
                }
                for split in SPLITS
            },
        }
        with atomic_file(meta_path) as staging:  # written last: its presence marks a complete cache
            staging.write_text(json.dumps(meta, indent=2) + "\n")
        return meta

    def _write_tokens(
        self, documents: list[Document], handle: Any, dtype: np.dtype, vocab_size: int, eos_id: int
    ) -> int:
        n_tokens = 0
        for document in documents:
            encoded = self.tokenizer.encode(document.text)
            ids = np.empty(len(encoded) + 1, dtype=np.int64)
            ids[:-1] = encoded
            ids[-1] = eos_id  # EOS after every document
            if ids.min() < 0 or ids.max() >= vocab_size:
                bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
                raise TokenizerError(
                    f"{type(self.tokenizer).__name__} produced token id {bad} for document {document.name!r}, "
                    f"outside 0..{vocab_size - 1} (its vocab_size is {vocab_size}). A tokenizer's ids must be "
                    "below its vocab_size."
                )
            ids.astype(dtype).tofile(handle)
            n_tokens += len(ids)
        return n_tokens

    def _windows(self, meta: dict[str, Any], split: str) -> TokenWindows:
        info = meta["splits"][split]
        dataset = TokenWindows(self.cache_dir / info["file"], meta["dtype"], info["tokens"], self.seq_len, self.stride)
        if len(dataset) == 0:
            raise DataError(
                f"The {split} split of corpus {self.corpus!r} has {info['tokens']} tokens ({len(info['documents'])} "
                f"document(s)), but one sample needs seq_len + 1 = {self.seq_len + 1} tokens (seq_len={self.seq_len})."
                " Lower seq_len, or use a longer corpus or a larger holdout."
            )
        if split == "train" and len(dataset) < self.batch_size:
            raise DataError(
                f"The train split of corpus {self.corpus!r} has {info['tokens']} tokens, which make {len(dataset)} "
                f"window(s) of seq_len + 1 = {self.seq_len + 1} tokens with stride {self.stride}: fewer than "
                f"batch_size={self.batch_size}, so no full training batch exists. Lower batch_size, seq_len or "
                "stride, or use a longer corpus."
            )
        return dataset

    def _loader(self, split: str, **kwargs: Any) -> DataLoader:
        if split not in self.datasets:
            self.setup(next(stage for stage, splits in _STAGE_SPLITS.items() if split in splits))
        kwargs.update(num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        kwargs.update(pin_memory=torch.cuda.is_available())
        if split == "train":  # shuffled, sharded over the ranks, and resumable mid-epoch
            return resumable_loader(self.datasets[split], self.batch_size, shuffle=True, seed=self.seed, **kwargs)
        return DataLoader(self.datasets[split], batch_size=self.batch_size, **kwargs)


def _check_int(name: str, value: Any, minimum: int | None = None, extra: str = "") -> None:
    check_int("TextDataModule", name, value, minimum, extra)


def _check_holdout(name: str, value: Any) -> None:
    ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) or (
        isinstance(value, float) and 0.0 < value < 1.0
    )
    if not ok:
        raise ConfigError(
            f"TextDataModule {name}={value!r} is not allowed: give a number of whole documents to hold out (an "
            "integer >= 1) or a fraction of the documents (a float strictly between 0 and 1)."
        )


def split_by_document(
    documents: list[Document], val_documents: int | float, test_documents: int | float | None, seed: int, corpus: str
) -> dict[str, list[Document]]:
    """Hold out whole documents: a shuffle of the sorted names seeded with ``seed``; the first ones validate.

    Returns ``{"train", "val", "test"}`` (``test`` is ``val`` when ``test_documents`` is None), each in corpus
    order. The same arguments give the same split to every data module (a fine-tuning run can evaluate on
    the documents its pretraining held out).
    """
    n = len(documents)
    order = sorted(range(n), key=lambda i: documents[i].name)
    random.Random(seed).shuffle(order)
    n_val = _holdout_count(val_documents, n)
    n_test = 0 if test_documents is None else _holdout_count(test_documents, n)
    if n_val + n_test > n - 1:
        raise DataError(
            f"Corpus {corpus!r} has {n} documents, too few to hold out val_documents="
            f"{val_documents!r} ({n_val}) and test_documents={test_documents!r} ({n_test}) and "
            "still train on at least one. Lower the holdout or use a corpus with more documents."
        )
    val_ids, test_ids = set(order[:n_val]), set(order[n_val : n_val + n_test])
    val = [d for i, d in enumerate(documents) if i in val_ids]
    test = [d for i, d in enumerate(documents) if i in test_ids] if n_test else val
    train = [d for i, d in enumerate(documents) if i not in val_ids and i not in test_ids]
    return {"train": train, "val": val, "test": test}


def _holdout_count(value: int | float, n_documents: int) -> int:
    return value if isinstance(value, int) else max(1, round(value * n_documents))


def _tokenizer_digest(tokenizer: Tokenizer) -> str:
    """sha256 over the files ``tokenizer.save`` writes, to key caches on a tokenizer trained elsewhere."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="lightningllm-tokenizer-") as tmp:
        tokenizer.save(tmp)
        for path in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
            digest.update(path.relative_to(tmp).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
