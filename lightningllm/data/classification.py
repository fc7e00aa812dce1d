"""ClassificationDataModule: labelled texts from JSONL or CSV, in the model's own tokens, padded per batch."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightningllm.data.classification_files import Example, order_labels, read_examples
from lightningllm.errors import ConfigError, DataError
from lightningllm.hparams import save_hyperparameters
from lightningllm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Truncation = Literal["right", "left"]
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class EncodedTexts(Dataset):
    """Token ids of each text with its class id; item ``i`` is ``{"input_ids": (T_i,), "labels": (), "index": ()}``.

    ``labels`` is -1 for an unlabelled text (prediction); ``index`` is the text's position in its file.
    """

    def __init__(self, ids: list[list[int]], labels: list[int]) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {
            "input_ids": torch.tensor(self.ids[index], dtype=torch.long),
            "labels": torch.tensor(self.labels[index], dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
        }


def pad_batch(items: list[dict[str, Tensor]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad rows to the longest row of the batch (dynamic padding).

    Returns:
        ``{"input_ids": (B, T) int64, "attention_mask": (B, T) bool (True at real tokens), "labels": (B,) int64,
        "index": (B,) int64}`` with ``T`` the longest row's length.
    """
    longest = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.bool)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n] = item["input_ids"]
        attention_mask[row, :n] = True
    labels = torch.stack([item["labels"] for item in items])
    index = torch.stack([item["index"] for item in items])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "index": index}


class ClassificationDataModule(L.LightningDataModule):
    """Texts with a class label, read from JSONL or CSV files, for :class:`~lightningllm.tasks.SequenceClassification`.

    Each file holds one example per JSON line (``*.jsonl``) or CSV row (``*.csv`` with a header; ``*.tsv``
    tab-separated) with a text column and a label column (names set by ``text_column`` and ``label_column``).
    Labels are names (strings, or integers read as their string). The classes are ``labels`` when given (in
    that order), else the distinct labels of the training file in sorted order (numerically when every
    label is an integer): sorting makes the class ids independent of the row order. A validation or test
    label outside the classes is refused, as is a training file with a single class.

    Texts are encoded with the model's own tokenizer: ``tokenizer_dir`` names an export folder (or any
    folder written by ``Tokenizer.save``), so a classifier fine-tuned from an export reads text exactly
    as its backbone was trained to. A ``tokenizer`` plugin instead is used as it is, or trained on the
    training texts when it is not trained yet. Each row is ``<bos>`` (with ``add_bos``) followed by the
    text's ids, truncated to ``max_length`` tokens by dropping ids at the ``truncation`` end ("right":
    the text's end, keeping its beginning; "left": its beginning; ``<bos>`` is always kept).

    Batches are padded to their longest row with the tokenizer's ``<pad>`` id, on the right:
    ``{"input_ids": (B, T), "attention_mask": (B, T) bool, "labels": (B,), "index": (B,)}``; ``labels`` is -1
    for unlabelled prediction rows and ``index`` is the row's position in its file. The training loader
    shuffles (seeded) and keeps the last partial batch; the others keep file order.

    Args:
        train_file: training examples.
        val_file: validation examples.
        test_file: test examples; None tests on ``val_file``.
        predict_file: texts to classify with ``lightningllm predict`` (labels optional); None: ``val_file``.
        tokenizer: a tokenizer plugin (trained on the training texts if it is not trained yet).
        tokenizer_dir: an export folder (or saved tokenizer folder) whose tokenizer to load; exactly one of
            ``tokenizer`` and ``tokenizer_dir``.
        text_column: the column (JSON key) holding the text.
        label_column: the column holding the label.
        labels: the class names in class-id order; None: the training labels, sorted.
        max_length: tokens per row at most, ``<bos>`` included.
        truncation: which end of a long text loses tokens, "right" or "left".
        add_bos: start every row with ``<bos>`` (the [CLS] position of an encoder's first-token pooling).
        batch_size: rows per batch (B).
        num_workers: DataLoader worker processes (0 loads in the main process).
        seed: seed of the training order.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        tokenizer: Tokenizer | None = None,
        tokenizer_dir: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        labels: list[str] | None = None,
        max_length: int = 128,
        truncation: Truncation = "right",
        add_bos: bool = True,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        _check_options(tokenizer, tokenizer_dir, labels, max_length, truncation, batch_size, num_workers)
        save_hyperparameters(self, injected=("tokenizer",))
        self.files = {"train": train_file, "val": val_file, "test": test_file, "predict": predict_file}
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(tokenizer_dir)
        self.text_column, self.label_column = text_column, label_column
        self.explicit_labels = list(labels) if labels is not None else None
        self.max_length, self.truncation, self.add_bos = max_length, truncation, add_bos
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.examples: dict[str, list[Example]] = {}
        self.datasets: dict[str, EncodedTexts] = {}
        self._label_names: list[str] | None = None

    # --- what the CLI, the task and the prediction writer read ----------------------------------
    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (training it first when needed)."""
        self._prepare_tokenizer()
        return self.tokenizer.vocab_size

    @property
    def label_names(self) -> list[str]:
        """The class names, in class-id order."""
        if self._label_names is None:
            self._label_names = self.explicit_labels or self._training_labels()
        return self._label_names

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    def split_file(self, split: str) -> Path:
        """The file a split reads: test and predict fall back to the validation file."""
        files = self.resolved_files()
        path = files[split] or (files["val"] if split in ("test", "predict") else None)
        if path is None:
            raise ConfigError(
                f"ClassificationDataModule has no {split}_file, so it cannot serve the {split} split. Set "
                f"{split}_file to a JSONL or CSV file"
                + (" (or val_file, which it falls back to)." if split in ("test", "predict") else ".")  # fmt: skip
            )
        return Path(path)

    def resolved_files(self) -> dict[str, str | None]:
        """The configured files; a subclass that builds its files (a built-in task) overrides this."""
        return self.files

    # --- LightningDataModule hooks ---------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        for split in _STAGE_SPLITS.get(stage or "", ("train", "val", "test")):
            self.datasets[split] = self._encode(split)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader("train", shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    # --- reading and encoding ---------------------------------------------------------------------
    def read(self, split: str) -> list[Example]:
        """The examples of a split (read once); labels are required except for prediction."""
        if split not in self.examples:
            path = self.split_file(split)
            examples = read_examples(path, self.text_column, self.label_column, require_label=split != "predict")
            self.examples[split] = examples
        return self.examples[split]

    def _training_labels(self) -> list[str]:
        names = order_labels({e.label for e in self.read("train")})
        if len(names) < 2:
            raise DataError(
                f"The training file {str(self.split_file('train'))!r} has a single label {names[0]!r}: a classifier "
                "needs examples of at least two classes."
            )
        return names

    def _class_ids(self, split: str, examples: list[Example]) -> list[int]:
        ids = {name: i for i, name in enumerate(self.label_names)}
        for example in examples:
            if example.label is not None and example.label not in ids:
                where = "in the labels option" if self.explicit_labels else "in the training file"
                raise DataError(
                    f"Line {example.line} of {str(self.split_file(split))!r} has label {example.label!r}, which is "
                    f"not among the classes {where}: {', '.join(map(repr, self.label_names))}. A classifier can only "
                    "be scored on classes it was trained on: fix the label, or add training examples of it."
                )
        return [-1 if e.label is None else ids[e.label] for e in examples]

    def _prepare_tokenizer(self) -> None:
        if not self.tokenizer.is_trained:
            texts = [e.text for e in self.read("train")]
            log.info("Training %s on %d training texts", type(self.tokenizer).__name__, len(texts))
            self.tokenizer.train(texts, getattr(self.tokenizer, "target_vocab_size", None))

    def encode(self, text: str) -> list[int]:
        """One row: ``[<bos>] + ids``, truncated to ``max_length`` at the ``truncation`` end."""
        self._prepare_tokenizer()
        ids = self.tokenizer.encode(text)
        room = self.max_length - int(self.add_bos)
        if len(ids) > room:
            ids = ids[:room] if self.truncation == "right" else ids[len(ids) - room :]
        return [self.tokenizer.bos_id, *ids] if self.add_bos else ids

    def _encode(self, split: str) -> EncodedTexts:
        examples = self.read(split)
        labels = self._class_ids(split, examples)
        rows = [self.encode(e.text) for e in examples]
        if not all(rows):
            empty = next(e for e, r in zip(examples, rows) if not r)
            raise DataError(
                f"Line {empty.line} of {str(self.split_file(split))!r} has an empty text and add_bos is off, so its "
                "row would hold no token. Remove the row or turn add_bos on."
            )
        return EncodedTexts(rows, labels)

    def _loader(self, split: str, **kwargs: Any) -> DataLoader:
        if split not in self.datasets:
            self.datasets[split] = self._encode(split)
        return DataLoader(
            self.datasets[split], batch_size=self.batch_size, num_workers=self.num_workers,
            collate_fn=partial(pad_batch, pad_id=self.pad_id), persistent_workers=self.num_workers > 0, **kwargs,
        )  # fmt: skip


def _load_tokenizer(tokenizer_dir: str) -> Tokenizer:
    path = Path(tokenizer_dir).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"ClassificationDataModule tokenizer_dir={tokenizer_dir!r} is not a folder. Name the export folder of the "
            "model you fine-tune (its tokenizer_config.json is read), or a folder written by Tokenizer.save."
        )
    return Tokenizer.load(path)


def _check_options(
    tokenizer: Tokenizer | None,
    tokenizer_dir: str | None,
    labels: list[str] | None,
    max_length: int,
    truncation: str,
    batch_size: int,
    num_workers: int,
) -> None:
    if (tokenizer is None) == (tokenizer_dir is None):
        raise ConfigError(
            "ClassificationDataModule needs exactly one of tokenizer (a tokenizer plugin) and tokenizer_dir (the "
            "export folder of the model you fine-tune, whose tokenizer it was trained with)."
        )
    for name, value, minimum in (("max_length", max_length, 1), ("batch_size", batch_size, 1),
                                 ("num_workers", num_workers, 0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(
                f"ClassificationDataModule {name}={value!r} is not allowed: it must be an integer >= {minimum}."
            )
    if truncation not in ("right", "left"):
        raise ConfigError(
            f"ClassificationDataModule truncation={truncation!r} is not allowed: 'right' drops a long text's end, "
            "'left' its beginning."
        )
    if labels is not None and (len(set(labels)) != len(labels) or len(labels) < 2):
        raise ConfigError(
            f"ClassificationDataModule labels={labels!r} is not allowed: give at least two distinct class names, "
            "in class-id order (or leave labels unset to use the training file's labels, sorted)."
        )
