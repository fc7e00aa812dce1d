"""The pretraining of a start export: its training and held-out windows, and a model's next-token loss on them."""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightningllm.contracts import IGNORE_INDEX
from lightningllm.data.text import TextDataModule
from lightningllm.errors import ConfigError
from lightningllm.models.base import token_positions
from lightningllm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class PretrainingData:
    """The corpus a start export was pretrained on, split as its pretraining run split it.

    An export records its model and tokenizer, not its data, and a start may come from elsewhere (an
    older export, a folder copied from another machine), so the pretraining data is named here, with the
    values of the pretraining run's ``TextDataModule``: the same ``corpus``, ``val_documents`` and ``seed``
    hold out the same documents. The tokenizer is the export's own.

    :meth:`loss` scores a model on pretraining windows through one rule shared by replay, EWC and the
    ledger: a model with a token head by its own head; a model whose head was replaced (a classifier) by a
    frozen copy of the start export's LM head over the model's current hidden states.

    Args:
        export: the start export folder (its tokenizer, and its LM head for models that lost theirs).
        corpus: the pretraining corpus, as in ``TextDataModule`` (``"shakespeare"``, a file, a folder).
        val_documents: the documents the pretraining run held out (count or fraction, as in ``TextDataModule``).
        seed: the pretraining run's data seed (it chose the held-out documents).
        seq_len: tokens per window.
        batch_size: windows per held-out batch.
        data_dir: cache root of corpora and token arrays.
    """

    def __init__(
        self,
        export: str,
        corpus: str = "shakespeare",
        val_documents: int | float = 0.05,
        seed: int = 1234,
        seq_len: int = 128,
        batch_size: int = 32,
        data_dir: str = ".cache/lightningllm",
    ) -> None:
        self.export = export
        self.options = dict(corpus=corpus, data_dir=data_dir, seq_len=seq_len, batch_size=batch_size,
                            val_documents=val_documents, seed=seed)  # fmt: skip
        self._data: TextDataModule | None = None
        self._start_head: nn.Module | None = None

    @property
    def data(self) -> TextDataModule:
        """The pretraining run's data module, with the export's tokenizer (built on first use: parsing a config
        reads no file)."""
        if self._data is None:
            self._data = TextDataModule(Tokenizer.load(self.export), **self.options)
        return self._data

    def windows(self, split: str, indices: Tensor) -> dict[str, Tensor]:
        """``{"input_ids", "labels"}`` (N, T) of the windows ``indices`` (N,) of ``split`` ("train" or "val")."""
        dataset = self.dataset(split)
        items = [dataset[int(i)] for i in indices]
        return {key: torch.stack([item[key] for item in items]) for key in ("input_ids", "labels")}

    def dataset(self, split: str):
        """The token windows of ``split`` (tokenising the corpus on first use)."""
        if split not in self.data.datasets:
            self.data.setup("fit")
        return self.data.datasets[split]

    def held_out(self, n_batches: int) -> list[dict[str, Tensor]]:
        """The first ``n_batches`` batches of the held-out windows, in order (the same every call)."""
        n = min(len(self.dataset("val")), n_batches * self.data.batch_size)
        return [self.windows("val", torch.arange(start, min(start + self.data.batch_size, n)))
                for start in range(0, n, self.data.batch_size)]  # fmt: skip

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Mean next-token cross-entropy of ``model`` on ``batch`` ({"input_ids", "labels"} (N, T), on its device)."""
        room = token_positions(model)  # prompt and prefix tuning take the first positions
        input_ids, labels = batch["input_ids"][:, -room:], batch["labels"][:, -room:]
        logits = self.token_logits(model, input_ids)  # (N, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)

    def token_logits(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        """input_ids: (N, T) -> next-token logits (N, T, V) from the model's own token head or the start's LM head."""
        if model.head.outputs == "tokens":
            return model(input_ids)
        hidden = model.hidden_states(input_ids)  # (N, T, dim)
        head = self.start_head(hidden.device)
        return head(hidden.to(head.weight.dtype))  # float32 under bf16-true too; autocast still applies

    def start_head(self, device: torch.device) -> nn.Module:
        """A frozen copy of the start export's LM head (kept out of the task: no optimizer, no checkpoint)."""
        if self._start_head is None:
            from lightningllm.io import load

            start, _ = load(self.export)
            if start.head.outputs != "tokens":
                raise ConfigError(
                    f"The start export {self.export!r} has a {type(start.head).__name__} head, not a language-model "
                    "head, so a fine-tuned model without a token head cannot be scored on pretraining text. Name the "
                    "export that was pretrained as a language model."
                )
            self._start_head = copy.deepcopy(start.head).requires_grad_(False).eval()
            log.info("Pretraining loss: a frozen copy of %s's %s scores the model's hidden states", self.export,
                     type(start.head).__name__)  # fmt: skip
        return self._start_head.to(device)
