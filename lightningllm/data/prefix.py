"""PrefixLMDataModule: next-token windows that also say where each example's bidirectional prefix ends."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightningllm.data.text import SPLITS, TextDataModule
from lightningllm.errors import ConfigError
from lightningllm.tokenizer import Tokenizer


class PrefixWindows(Dataset):
    """Adds a prefix length to every item of a window dataset, drawn from the item's index and a seed.

    Item ``i`` is the wrapped item (``{"input_ids": (T,), "labels": (T,)}``) plus
    ``"prefix_lengths"``, a 0-dim int64 tensor ``P`` uniform over the integers
    ``min_prefix .. max_prefix`` (both included, capped at the item's ``T``). ``P`` is a pure function
    of ``(seed, split, i)`` (numpy's ``default_rng`` seeded with that triple), so it is the same in every
    epoch, every DataLoader worker and every batch size, and a validation curve compares like with like.

    Args:
        windows: the dataset to wrap, for example a :class:`~lightningllm.data.TokenWindows`.
        min_prefix: the shortest prefix, in input tokens (>= 0).
        max_prefix: the longest prefix, in input tokens (>= min_prefix).
        seed: seed of the draw.
        split: which split this is (``"train"``, ``"val"``, ``"test"``); each split draws independently.
    """

    def __init__(self, windows: Dataset, min_prefix: int, max_prefix: int, seed: int, split: str) -> None:
        self.windows = windows
        self.min_prefix, self.max_prefix = min_prefix, max_prefix
        self.seed = seed
        self.split = split
        self._split_code = SPLITS.index(split) if split in SPLITS else len(SPLITS)

    def __len__(self) -> int:
        return len(self.windows)

    def prefix_length(self, index: int) -> int:
        """The prefix length P of item ``index``: uniform in ``min_prefix .. max_prefix``."""
        rng = np.random.default_rng([self.seed % 2**32, self._split_code, index])
        return int(rng.integers(self.min_prefix, self.max_prefix + 1))

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = dict(self.windows[index])
        T = item["input_ids"].shape[0]
        item["prefix_lengths"] = torch.tensor(min(self.prefix_length(index), T), dtype=torch.long)  # ()
        return item


class PrefixLMDataModule(TextDataModule):
    """:class:`~lightningllm.data.TextDataModule` windows, each with its own prefix length, for prefix-LM.

    Batches are ``{"input_ids": (B, T), "labels": (B, T), "prefix_lengths": (B,)}`` (int64): the
    windows, tokenizer, caching, splits and loaders of :class:`~lightningllm.data.TextDataModule`,
    unchanged, plus per example a prefix length ``P`` that
    :class:`~lightningllm.tasks.prefix_lm.PrefixLM` turns into the attention mask (the first ``P``
    input tokens attend to each other bidirectionally, the rest causally) and the loss mask
    (no loss on predicting a token inside the prefix). ``labels`` stay the plain shifted inputs, so
    the same batches also feed :class:`~lightningllm.tasks.CausalLM`, which ignores ``prefix_lengths``.

    The split point: T5's prefix-LM objective on unlabelled text (Raffel et al., 2020, "Exploring the
    Limits of Transfer Learning with a Unified Text-to-Text Transformer", section 3.2.3) takes a span and
    "chooses a random point to split it into prefix and target portions"; UL2's S-denoiser (Tay et al.,
    2022) does the same. Here ``P`` is uniform over the integers ``min_prefix .. max_prefix`` (defaults:
    ``1 .. seq_len``, every split point of the window), drawn from ``(seed, split, window index)`` only
    (see :class:`PrefixWindows`): validation scores the same split points at every evaluation, and a
    training window keeps its split point from epoch to epoch. UniLM's sequence-to-sequence mask (Dong
    et al., 2019) is the same attention pattern with the split given by the data (source | target).

    Args:
        tokenizer: the tokenizer plugin (see :class:`~lightningllm.data.TextDataModule`).
        corpus: ``"shakespeare"``, a UTF-8 text file or a folder of ``*.txt`` files.
        data_dir: root of the corpus and token caches.
        seq_len: tokens per sample (T).
        stride: tokens between the starts of consecutive windows; None means ``seq_len``.
        batch_size: samples per batch (B).
        val_documents: documents held out for validation (a count or a fraction).
        test_documents: documents held out for testing; None tests on the validation documents.
        num_workers: DataLoader worker processes.
        seed: seed of the holdout, of the training order and of the prefix lengths.
        min_prefix: the shortest prefix, in input tokens: an integer in ``0 .. seq_len`` (0 and 1 both
            mean plain causal attention with a loss on every position).
        max_prefix: the longest prefix, in input tokens: an integer in ``min_prefix .. seq_len``; None
            means ``seq_len`` (the whole window is prefix but its last label: one scored token).
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
        min_prefix: int = 1,
        max_prefix: int | None = None,
    ) -> None:
        super().__init__(
            tokenizer, corpus=corpus, data_dir=data_dir, seq_len=seq_len, stride=stride, batch_size=batch_size,
            val_documents=val_documents, test_documents=test_documents, num_workers=num_workers, seed=seed,
        )  # fmt: skip
        max_prefix = seq_len if max_prefix is None else max_prefix
        _check_prefix_range(min_prefix, max_prefix, seq_len)
        self.min_prefix, self.max_prefix = min_prefix, max_prefix

    def setup(self, stage: str | None = None) -> None:
        """Open the token windows of the splits ``stage`` needs, each with its prefix lengths."""
        super().setup(stage)
        for split, windows in self.datasets.items():
            if not isinstance(windows, PrefixWindows):
                self.datasets[split] = PrefixWindows(windows, self.min_prefix, self.max_prefix, self.seed, split)


def _check_prefix_range(min_prefix: Any, max_prefix: Any, seq_len: int) -> None:
    for name, value in (("min_prefix", min_prefix), ("max_prefix", max_prefix)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"PrefixLMDataModule {name}={value!r} is not allowed: prefix lengths are counted in input tokens, "
                f"so {name} must be an integer in 0..seq_len (seq_len={seq_len})."
            )
    if not 0 <= min_prefix <= max_prefix <= seq_len:
        raise ConfigError(
            f"PrefixLMDataModule min_prefix={min_prefix}, max_prefix={max_prefix} is not allowed: each example's "
            f"prefix length is drawn uniformly from min_prefix..max_prefix, which must satisfy "
            f"0 <= min_prefix <= max_prefix <= seq_len (seq_len={seq_len}). Leave max_prefix unset for seq_len."
        )
