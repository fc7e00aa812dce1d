"""Reward modelling: a backbone with a ScalarHead scores completions; ranked data says which should score higher."""

from __future__ import annotations

import logging
from functools import partial
from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from lightningllm.alignment.logprobs import padded_inputs
from lightningllm.alignment.reward_losses import (
    REWARD_LOSSES,
    ListTargets,
    RewardLoss,
    bradley_terry_loss,
    hinge_reward_loss,
    listwise_loss,
    mse_gap_loss,
    ordered_pairs,
)
from lightningllm.checks import check_number
from lightningllm.contracts import check_model
from lightningllm.errors import ConfigError, DataError
from lightningllm.hparams import save_hyperparameters
from lightningllm.registry import get
from lightningllm.tasks.base import TrainingTask
from lightningllm.tasks.optim import Schedule

log = logging.getLogger(__name__)

RewardPooling = Literal["last", "completion_mean", "end_token"]
POOLINGS = ("last", "completion_mean", "end_token")


class RewardModeling(TrainingTask):
    """A reward model (Ouyang et al., 2022, section 3.5): one score per prompt + completion, trained on rankings.

    The model is usually the SFT export with a ``ScalarHead``; a model with another head gets a fresh one (and the
    log says so). The trained model exports like any other (:class:`~lightningllm.callbacks.Export`), so a judge
    loads it with :func:`lightningllm.io.load`.

    Batches come from :class:`~lightningllm.data.PreferenceDataModule`: ``input_ids``, ``attention_mask`` and
    ``completion_mask`` (B * K, T), the K completions of each prompt side by side, and ``ranks`` (B, K), 0 = best.
    Pairwise losses train on every strictly ordered pair of a prompt's completions; ``listwise`` on the K at once.

    Logs ``train/loss``, ``{train,val}/accuracy`` (the share of ordered pairs scored in the right order) and
    ``{train,val}/margin`` (the mean score of the better minus the worse completion).

    Args:
        model: the backbone, already built (with its start weights and transforms, e.g. LoRA).
        optimizer: called with parameter groups; norms, biases and embeddings get no weight decay.
        loss: ``bradley_terry`` (``-log sigmoid(r_w - r_l - margin)``), ``hinge`` (``max(0, margin - (r_w - r_l))``),
            ``mse`` (``(r_w - r_l - target_gap)^2``) or ``listwise`` (softmax cross-entropy over the K completions).
        margin: the margin (>= 0) of ``bradley_terry`` and ``hinge``; None: 0 for ``bradley_terry``, 1 for ``hinge``.
        target_gap: the score gap ``mse`` regresses onto.
        targets: ``listwise`` targets: ``one_hot`` (the best completion) or ``graded`` (``softmax(-rank)``).
        pooling: where the score is read: ``last`` real token, ``completion_mean`` (the mean over the completion's
            tokens only), or ``end_token`` (the last ``end_token_id`` of the row; a row without one is refused).
        end_token_id: the token ``end_token`` pooling reads at (None: the data's tokenizer's ``eos_id``).
        warmup_steps, schedule, min_lr_ratio, activation_checkpointing, compile: as in
            :class:`~lightningllm.tasks.CausalLM`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        loss: RewardLoss = "bradley_terry",
        margin: float | None = None,
        target_gap: float = 1.0,
        targets: ListTargets = "one_hot",
        pooling: RewardPooling = "last",
        end_token_id: int | None = None,
        warmup_steps: int = 20,
        schedule: Schedule = "cosine",
        min_lr_ratio: float = 0.1,
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        check_model(model, "RewardModeling")
        _check_options(loss, margin, target_gap, targets, pooling)
        save_hyperparameters(self, injected=("model", "optimizer"))
        self.init_training(model, optimizer, warmup_steps, schedule, min_lr_ratio, activation_checkpointing, compile)
        self.loss_name, self.target_gap, self.targets = loss, target_gap, targets
        self.margin = margin if margin is not None else 1.0 if loss == "hinge" else 0.0
        self.pooling, self.end_token_id = pooling, end_token_id
        self._fit_head()
        for split in ("train", "val"):
            setattr(self, f"{split}_accuracy", BinaryAccuracy())
            setattr(self, f"{split}_margin", MeanMetric())

    def _fit_head(self) -> None:
        head_pooling = "mean" if self.pooling == "completion_mean" else "last"
        scalar_head = get("head", "ScalarHead")
        if not isinstance(self.model.head, scalar_head):
            self.model.replace_head(partial(scalar_head, pooling=head_pooling), reason="RewardModeling needs a score")
        elif self.model.head.pooling != head_pooling:
            raise ConfigError(
                f"RewardModeling pooling={self.pooling!r} reads the score with ScalarHead pooling {head_pooling!r}, "
                f"but the model's ScalarHead pools {self.model.head.pooling!r}. Set the head's pooling to "
                f"{head_pooling!r} or leave the head out of the model config and let RewardModeling create it."
            )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "unpaired", False):
            raise ConfigError(
                "RewardModeling trains on rankings, but the data module gives unpaired completions (unpaired: true). "
                "Set the data module's unpaired: false."
            )
        if self.pooling == "end_token" and self.end_token_id is None:
            tokenizer = getattr(datamodule, "tokenizer", None)
            if tokenizer is None:
                raise ConfigError("RewardModeling pooling='end_token' needs end_token_id (no data tokenizer to ask).")
            self.end_token_id = tokenizer.eos_id

    def forward(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> Tensor:
        """input_ids, attention_mask, completion_mask: (N, T) -> scores (N,), one per prompt + completion row."""
        hidden = self.model.hidden_states(input_ids, **padded_inputs(attention_mask))  # (N, T, dim)
        return self.model.head(hidden, padding=self._read_at(input_ids, attention_mask.bool(), completion_mask.bool()))

    def _read_at(self, input_ids: Tensor, real: Tensor, completion: Tensor) -> Tensor:
        """(N, T) bool: the tokens the head pools over (the last True is read by ``last`` pooling)."""
        if self.pooling == "completion_mean":
            return real & completion
        if self.pooling == "last":
            return real
        is_end = real & (input_ids == self.end_token_id)
        if not bool(is_end.any(-1).all()):
            raise DataError(
                f"RewardModeling pooling='end_token' reads the score at token {self.end_token_id}, but a row has none. "
                "End every completion with that token (the data module's template does, with its end of turn)."
            )
        last_end = torch.where(is_end, torch.arange(real.shape[1], device=real.device), -1).amax(-1, keepdim=True)
        return real & (torch.arange(real.shape[1], device=real.device) <= last_end)

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """The loss, and the scores of the better and the worse completion of every ordered pair, (M,) each."""
        scores = self(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).float()  # (B * K,)
        ranks = batch["ranks"]
        better, worse = ordered_pairs(ranks)
        if self.loss_name == "listwise":
            loss = listwise_loss(scores.view(ranks.shape), ranks, self.targets).mean()
        elif self.loss_name == "bradley_terry":
            loss = bradley_terry_loss(scores[better], scores[worse], self.margin).mean()
        elif self.loss_name == "hinge":
            loss = hinge_reward_loss(scores[better], scores[worse], self.margin).mean()
        else:
            loss = mse_gap_loss(scores[better], scores[worse], self.target_gap).mean()
        return loss, scores[better], scores[worse]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, better, worse = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self._log_metrics("train", better, worse)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, better, worse = self.loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self._log_metrics("val", better, worse)

    def _log_metrics(self, split: str, better: Tensor, worse: Tensor) -> None:
        accuracy, margin = getattr(self, f"{split}_accuracy"), getattr(self, f"{split}_margin")
        accuracy(better - worse, torch.ones_like(better, dtype=torch.long))  # a positive margin is a right order
        margin(better - worse)
        self.log(f"{split}/accuracy", accuracy, prog_bar=split == "val")
        self.log(f"{split}/margin", margin)


def _check_options(loss, margin, target_gap, targets, pooling) -> None:
    if loss not in REWARD_LOSSES:
        raise ConfigError(
            f"RewardModeling loss={loss!r} is not a reward loss: choose one of {', '.join(REWARD_LOSSES)}."
        )
    if margin is not None:
        check_number("RewardModeling", "margin", margin, 0.0)
    check_number("RewardModeling", "target_gap", target_gap)
    if targets not in ("one_hot", "graded"):
        raise ConfigError(f"RewardModeling targets={targets!r} must be 'one_hot' or 'graded'.")
    if pooling not in POOLINGS:
        raise ConfigError(
            f"RewardModeling pooling={pooling!r} is not allowed: choose one of {', '.join(POOLINGS)} (last: the last "
            "real token; completion_mean: the mean over the completion; end_token: the last end token)."
        )
