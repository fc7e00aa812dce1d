"""Prompts for online RL: each as the text a judge reads and the ids the policy continues."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightningllm.data.corpus import SHAKESPEARE, load_corpus
from lightningllm.data.instruction_shakespeare import shakespeare_instructions
from lightningllm.data.resumable import resumable_loader
from lightningllm.data.text import split_by_document
from lightningllm.errors import ConfigError, DataError
from lightningllm.hparams import save_hyperparameters
from lightningllm.prompt import PromptTemplate
from lightningllm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def prompt_text(record: object, where: str) -> str:
    """The user's text of a record: its ``prompt``, or an Alpaca ``instruction`` then its ``input`` after a
    blank line (as the chat template joins them, and as the judges read them)."""
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        return record["prompt"]
    if isinstance(record, dict) and isinstance(record.get("instruction"), str):
        return record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    raise DataError(f"{where} holds no prompt: each line must be an object with a 'prompt' or 'instruction' string.")


class PromptDataModule(L.LightningDataModule):
    """Prompts for :class:`~lightningllm.tasks.PPO` and :class:`~lightningllm.tasks.GRPO`.

    Batches are ``{"input_ids": [B 1-D id tensors], "prompts": [B texts]}``: the ids are the prompt rendered by
    ``template`` as a user turn with the assistant's turn opened (what an instruction-tuned policy continues), the
    text is the user's words alone (what a judge reads).

    Args:
        tokenizer_dir: the policy's tokenizer (its export folder).
        train: ``"shakespeare"`` (the questions the SFT demo was tuned on, from the plays not held out) or a JSON
            lines file whose records hold a ``prompt`` or an Alpaca ``instruction`` (and ``input``).
        template: a built-in prompt template (``chat``, ``alpaca``) or a ``.jinja`` path; None: the bare text.
        max_prompt_len: the most tokens of a prompt; longer ones are dropped (with a count in the log).
        batch_size: prompts per batch (each gets the task's ``group_size`` responses).
        val_documents: plays held out with ``train: shakespeare`` (as in the SFT data module, so its held-out
            plays stay unseen).
        seed: the play split and the order of the prompts.
        data_dir: cache root of the bundled corpus.
    """

    def __init__(
        self,
        tokenizer_dir: str,
        train: str = SHAKESPEARE,
        template: str | None = "chat",
        max_prompt_len: int = 96,
        batch_size: int = 16,
        val_documents: int | float = 2,
        seed: int = 1337,
        data_dir: str = ".cache/lightningllm",
    ) -> None:
        super().__init__()
        for name, value in (("max_prompt_len", max_prompt_len), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"PromptDataModule {name}={value!r} must be an integer >= 1.")
        save_hyperparameters(self, injected=())
        self.tokenizer: Tokenizer = Tokenizer.load(tokenizer_dir)
        self.template = PromptTemplate(template) if template is not None else None
        self.source, self.max_prompt_len, self.batch_size = train, max_prompt_len, batch_size
        self.val_documents, self.seed, self.data_dir = val_documents, seed, data_dir
        self.prompts: list[tuple[str, list[int]]] = []

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        """The ids the policy continues for a prompt text."""
        if self.template is None:
            return self.tokenizer.encode(text)
        return self.template.prompt_ids(self.tokenizer, [{"role": "user", "content": text}])

    def setup(self, stage: str | None = None) -> None:
        if self.prompts:
            return
        encoded = [(text, self.encode(text)) for text in self._texts()]
        self.prompts = [(text, ids) for text, ids in encoded if len(ids) <= self.max_prompt_len]
        if len(self.prompts) < len(encoded):
            log.info("%d of %d prompts are longer than max_prompt_len=%d tokens and were dropped",
                     len(encoded) - len(self.prompts), len(encoded), self.max_prompt_len)  # fmt: skip
        if not self.prompts:
            raise DataError(
                f"No prompt of {self.source!r} fits max_prompt_len={self.max_prompt_len} tokens; raise it (up to the "
                "model's max_seq_len minus the task's max_new_tokens)."
            )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return resumable_loader(self.prompts, min(self.batch_size, len(self.prompts)), shuffle=True, seed=self.seed,
                                drop_last=True, collate_fn=collate_prompts)  # fmt: skip

    def _texts(self) -> list[str]:
        if self.source != SHAKESPEARE:
            return read_prompts(Path(self.source))
        corpus = load_corpus(SHAKESPEARE, self.data_dir)
        plays = split_by_document(corpus, self.val_documents, None, self.seed, SHAKESPEARE)["train"]
        return [prompt_text(r, "record") for r in shakespeare_instructions(plays, lambda r: True, self.seed)]


def read_prompts(path: Path) -> list[str]:
    """The prompt texts of a JSON-lines file, blank lines skipped (:func:`prompt_text` of each record)."""
    if not path.is_file():
        raise DataError(f"Prompt file {str(path)!r} does not exist; pass a JSON-lines file or 'shakespeare'.")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            where = f"{path.name} line {number}"
            try:
                record = json.loads(line)
            except ValueError as err:
                raise DataError(f"{where} is not valid JSON ({err}); each line must hold one JSON object.") from None
            texts.append(prompt_text(record, where))
    return texts


def collate_prompts(items: list[tuple[str, list[int]]]) -> dict:
    """``(text, ids)`` items -> ``{"input_ids": [1-D tensors], "prompts": [texts]}``."""
    return {"input_ids": [torch.tensor(ids) for _, ids in items], "prompts": [text for text, _ in items]}
