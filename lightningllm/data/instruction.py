"""InstructionDataModule: conversations rendered by a prompt template, the loss on the responses only.

Records are JSON lines, either ``{"instruction", "input" (optional), "output"}`` (Alpaca) or
``{"messages": [{"role", "content"}, ...]}`` (chat, multi-turn), or ``"shakespeare"``: instructions
built from the bundled corpus (:mod:`lightningllm.data.instruction_shakespeare`), split by play.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from lightningllm.data.corpus import SHAKESPEARE, load_corpus
from lightningllm.data.instruction_shakespeare import shakespeare_instructions
from lightningllm.data.packing import Example, collate_packed, collate_padded, pack
from lightningllm.data.resumable import resumable_loader
from lightningllm.data.text import split_by_document
from lightningllm.errors import ConfigError, DataError
from lightningllm.hparams import save_hyperparameters
from lightningllm.prompt import PromptTemplate, check_messages
from lightningllm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def record_messages(record: object, where: str) -> list[dict]:
    """The conversation of one record: its ``messages``, or the user and assistant turns of an Alpaca record.

    Raises:
        DataError: the record is neither form; the paragraph names ``where`` and both allowed forms.
    """
    if isinstance(record, dict) and "messages" in record:
        return check_messages(record["messages"], where)
    if (
        isinstance(record, dict)
        and isinstance(record.get("instruction"), str)
        and isinstance(record.get("output"), str)
    ):
        source = record.get("input", "")
        if not isinstance(source, str):
            raise DataError(f"{where}: 'input' is {source!r}; it must be a string (or left out).")
        user = {"role": "user", "content": record["instruction"], "input": source}
        return check_messages([user, {"role": "assistant", "content": record["output"]}], where)
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(
        f"{where}: a record with {keys} is neither an Alpaca record (string 'instruction' and 'output', optional "
        "'input') nor a chat record ('messages': a list of {role, content})."
    )


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines file, blank lines skipped; each checked by :func:`record_messages`.

    Raises:
        DataError: a missing file, a line that is not JSON, a record of neither form, or no record at all.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(
            f"Instruction data {str(path)!r} does not exist. Pass a JSON-lines file, or 'shakespeare' for the "
            "instructions built from the bundled corpus."
        )
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            record = json.loads(line)
        except ValueError as err:
            raise DataError(f"{where} is not valid JSON ({err}); each line must hold one JSON object.") from None
        record_messages(record, where)
        records.append(record)
    if not records:
        raise DataError(f"Instruction data {str(path)!r} holds no record; write one JSON object per line.")
    return records


class InstructionDataset(Dataset):
    """Tokenised examples, one per item, or rows of packed examples when ``rows`` is given.

    Args:
        examples: ``(ids, trained)`` per example.
        rows: example indices per packed row (:func:`~lightningllm.data.packing.pack`), or None.
    """

    def __init__(self, examples: list[Example], rows: list[list[int]] | None = None) -> None:
        self.examples = examples
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.examples)

    def __getitem__(self, index: int) -> Example | list[Example]:
        if self.rows is None:
            return self.examples[index]
        return [self.examples[i] for i in self.rows[index]]


class InstructionDataModule(L.LightningDataModule):
    """Instruction tuning data: records rendered by a prompt template, tokenised segment by segment.

    The loss covers each response and its end-of-turn token (what the template marks as
    ``{% generation %}``); prompts and padding are ``IGNORE_INDEX``. Batches are ``{"input_ids",
    "labels"}`` (B, T) right-padded to the longest row, plus ``positions`` and ``document_ids`` when
    ``pack`` puts several examples in a row (attention then never crosses an example).

    The first ``n_eval`` validation records (in order) are the exact-match set: ``eval_set()`` gives their
    prompts and expected answers, which :class:`~lightningllm.tasks.InstructionTuning` checks by greedy
    generation.

    Args:
        tokenizer_dir: a folder holding a saved tokenizer (the start export: the model's own tokenizer).
        train: ``"shakespeare"`` or a JSON-lines file.
        val: a JSON-lines file; None with ``train: shakespeare`` holds out ``val_documents`` plays.
        template: a built-in prompt template (``alpaca``, ``chat``) or a path to a ``.jinja`` file.
        seq_len: the most tokens of an example (its ids minus one); a longer record is refused, or dropped
            when built from the corpus.
        batch_size: rows per batch.
        pack: put several examples in each row (first-fit decreasing).
        pack_len: the tokens of a packed row (None: ``seq_len``). Positions restart in each example, so a row
            may be longer than the model's ``max_seq_len``: only each example must fit it.
        n_eval: validation records checked by generation (0: none).
        val_documents: plays held out with ``train: shakespeare`` (count or fraction, as in TextDataModule).
        seed: the play split, the records built from the corpus and the training order.
        data_dir: cache root of the bundled corpus.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        tokenizer_dir: str,
        train: str = SHAKESPEARE,
        val: str | None = None,
        template: str = "chat",
        seq_len: int = 128,
        batch_size: int = 32,
        pack: bool = True,
        pack_len: int | None = None,
        n_eval: int = 200,
        val_documents: int | float = 2,
        seed: int = 1337,
        data_dir: str = ".cache/lightningllm",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        checks = [("seq_len", seq_len, 2), ("batch_size", batch_size, 1), ("n_eval", n_eval, 0)]
        for name, value, minimum in checks + ([("pack_len", pack_len, seq_len)] if pack_len is not None else []):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"InstructionDataModule {name}={value!r} must be an integer >= {minimum}.")
        if val is None and train != SHAKESPEARE:
            raise ConfigError(
                f"InstructionDataModule train={train!r} is a file, so val must name a JSON-lines file too (only "
                "train: shakespeare holds out plays by itself)."
            )
        save_hyperparameters(self, injected=())
        self.tokenizer: Tokenizer = Tokenizer.load(tokenizer_dir)
        self.template = PromptTemplate(template)
        self.train_source, self.val_source = train, val
        self.seq_len, self.batch_size, self.pack, self.n_eval = seq_len, batch_size, pack, n_eval
        self.pack_len = seq_len if pack_len is None else pack_len
        self.val_documents, self.seed, self.data_dir, self.num_workers = val_documents, seed, data_dir, num_workers
        self.records: dict[str, list[dict]] = {}
        self._encoded: dict[str, Example] = {}  # built records are tokenised once, while fitting them
        self.datasets: dict[str, InstructionDataset] = {}

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (linked to the model's by the CLI)."""
        return self.tokenizer.vocab_size

    def encode(self, record: dict, where: str = "record") -> Example:
        """``(ids, trained)`` of a record rendered by the template."""
        key = json.dumps(record, sort_keys=True)
        if key not in self._encoded:
            self._encoded[key] = self.template.encode(self.tokenizer, record_messages(record, where))
        return self._encoded[key]

    def eval_set(self) -> list[tuple[list[int], str, str]]:
        """``(prompt_ids, answer, task)`` for the first ``n_eval`` validation records."""
        self._load_records()
        out = []
        for record in self.records["val"][: self.n_eval]:
            messages = record_messages(record, "validation record")
            prompt = self.template.prompt_ids(self.tokenizer, messages[:-1])
            out.append((prompt, messages[-1]["content"], record.get("task", "all")))
        return out

    def setup(self, stage: str | None = None) -> None:
        self._load_records()
        for split in ("train", "val"):
            if split not in self.datasets:
                self.datasets[split] = self._dataset(split)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        collate = collate_packed if self.pack else collate_padded
        loader = partial(resumable_loader, shuffle=True, seed=self.seed, drop_last=True)
        dataset = self.datasets["train"]
        return loader(dataset, min(self.batch_size, len(dataset)), collate_fn=self._collate(collate), **self._workers())

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        collate = collate_packed if self.pack else collate_padded
        return DataLoader(self.datasets["val"], self.batch_size, collate_fn=self._collate(collate), **self._workers())

    # --- records -------------------------------------------------------------------------------
    def _load_records(self) -> None:
        if self.records:
            return
        if self.train_source == SHAKESPEARE and self.val_source is None:
            splits = split_by_document(
                load_corpus(SHAKESPEARE, self.data_dir), self.val_documents, None, self.seed, SHAKESPEARE
            )
            for split in ("train", "val"):
                self.records[split] = shakespeare_instructions(splits[split], self._fits, self.seed)
                log.info("%d %s instructions from %d plays", len(self.records[split]), split, len(splits[split]))
            return
        self.records["train"] = read_jsonl(self.train_source) if self.train_source != SHAKESPEARE else []
        self.records["val"] = read_jsonl(self.val_source)

    def _fits(self, record: dict) -> bool:
        return len(self.encode(record)[0]) - 1 <= self.seq_len

    def _dataset(self, split: str) -> InstructionDataset:
        source = self.train_source if split == "train" else self.val_source or self.train_source
        examples = []
        for number, record in enumerate(self.records[split], start=1):
            example = self.encode(record, f"{Path(source).name} record {number}")
            if len(example[0]) - 1 > self.seq_len:
                raise DataError(
                    f"{Path(source).name} record {number} renders to {len(example[0]) - 1} tokens, more than "
                    f"seq_len={self.seq_len}. Raise seq_len (up to the model's max_seq_len) or shorten the record."
                )
            if not any(example[1][1:]):
                raise DataError(f"{Path(source).name} record {number} has no response token to train on.")
            examples.append(example)
        if not examples:
            raise DataError(f"The {split} instruction data {source!r} gave no example.")
        self._encoded.clear()
        rows = pack([len(ids) - 1 for ids, _ in examples], self.pack_len) if self.pack else None
        return InstructionDataset(examples, rows)

    def _collate(self, collate) -> Any:
        return partial(_collate, collate=collate, pad_id=self.tokenizer.pad_id)

    def _workers(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}


def _collate(items: Sequence, collate, pad_id: int):
    return collate(items, pad_id)
