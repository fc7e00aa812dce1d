"""Causal language modelling: predict each next token."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics.text import Perplexity

from lightningllm.contracts import IGNORE_INDEX, aux_loss, check_model, module_metrics
from lightningllm.errors import ConfigError
from lightningllm.hparams import save_hyperparameters
from lightningllm.tasks.base import TrainingTask
from lightningllm.tasks.optim import Schedule


class CausalLM(TrainingTask):
    """Next-token cross-entropy over any model that maps ids (B, T) to logits (B, T, vocab_size).

    Batches are ``{"input_ids": (B, T), "labels": (B, T)}`` with labels already shifted
    (``labels[:, t] = ids[t + 1]``, -100 ignored), or a bare ids tensor (B, T + 1) that
    the task shifts itself. Clipping, accumulation, precision and distribution are Trainer
    arguments.

    Args:
        model: the network, already built (for example :class:`lightningllm.models.Decoder`).
        optimizer: called with parameter groups; norms, biases and embeddings get no weight decay.
        warmup_steps: linear warmup from zero.
        schedule: decay after warmup, over the Trainer's total optimizer steps.
        min_lr_ratio: final learning rate as a fraction of the peak.
        activation_checkpointing: recompute each ``Block`` in the backward pass to save memory.
        compile: ``torch.compile`` each ``Block`` (training and KV-cache decoding alike; names and
            exports unchanged).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 100,
        schedule: Schedule = "cosine",
        min_lr_ratio: float = 0.1,
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.check_model(model)
        save_hyperparameters(self, injected=("model", "optimizer"))
        self.init_training(model, optimizer, warmup_steps, schedule, min_lr_ratio, activation_checkpointing, compile)
        self.val_perplexity = Perplexity(ignore_index=IGNORE_INDEX)
        self._step_started: float | None = None

    def check_model(self, model: nn.Module) -> None:
        """Refuse, before training, a model this task cannot train (here: one that attends bidirectionally)."""
        check_model(model, type(self).__name__)
        self.ensure_token_head(model, type(self).__name__)
        if not model.causal:
            raise ConfigError(
                f"CausalLM needs a causal model, but {type(model).__name__} attends bidirectionally: every "
                "position would see the token it is asked to predict. Use a Decoder, or train this model "
                "with MaskedLM."
            )

    def setup(self, stage: str) -> None:
        tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        vocab_size = self.model.vocab_size
        if tokenizer is not None and tokenizer.vocab_size > vocab_size:
            raise ConfigError(
                f"The tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab_size}: "
                "token ids past the embedding table cannot be looked up. Set the model's vocab_size to at least "
                f"{tokenizer.vocab_size} (the CLI links data.vocab_size to it when you leave it out)."
            )

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids: (B, T) -> logits (B, T, vocab_size)."""
        return self.model(input_ids)

    def loss(self, batch: dict[str, Tensor] | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean next-token loss (plus any auxiliary loss), the logits and the labels."""
        input_ids, labels = _inputs_and_labels(batch)
        logits = self.model(input_ids)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return loss + aux_loss(self.model), logits, labels

    def training_step(self, batch: dict[str, Tensor] | Tensor, batch_idx: int) -> Tensor:
        loss, _, labels = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{key}": value for key, value in module_metrics(self.model).items()})
        self._log_throughput(labels.numel())
        return loss

    def validation_step(self, batch: dict[str, Tensor] | Tensor, batch_idx: int) -> None:
        loss, logits, labels = self.loss(batch)
        self.val_perplexity(logits.float(), labels)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/perplexity", self.val_perplexity)

    def test_step(self, batch: dict[str, Tensor] | Tensor, batch_idx: int) -> None:
        loss, _, _ = self.loss(batch)
        self.log("test/loss", loss, sync_dist=True)

    def predict_step(self, batch: dict[str, Tensor] | Tensor, batch_idx: int) -> Tensor:
        """Next-token probabilities at the last position, (B, vocab_size)."""
        input_ids = batch["input_ids"] if isinstance(batch, dict) else batch
        return self.model(input_ids)[:, -1].softmax(-1)

    def _log_throughput(self, n_tokens: int) -> None:
        now = time.perf_counter()
        if self._step_started is not None:
            tokens_per_sec = n_tokens * self.trainer.world_size / (now - self._step_started)
            self.log("train/tokens_per_sec", tokens_per_sec, prog_bar=True)
        self._step_started = now


def _inputs_and_labels(batch: dict[str, Tensor] | Tensor) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Tensor):
        return batch[:, :-1], batch[:, 1:]
    if "labels" in batch:
        return batch["input_ids"], batch["labels"]
    return batch["input_ids"][:, :-1], batch["input_ids"][:, 1:]
