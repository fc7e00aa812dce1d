"""Masked language modelling: recover the tokens hidden in a corrupted input (BERT)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightningllm.contracts import IGNORE_INDEX, aux_loss, check_model
from lightningllm.errors import ConfigError
from lightningllm.hparams import save_hyperparameters
from lightningllm.tasks.base import TrainingTask
from lightningllm.tasks.optim import Schedule

SPECIAL_IDS = (0, 1, 2, 3, 4)  # <pad> <unk> <bos> <eos> <mask> in every lightningllm tokenizer
MODEL_INPUTS = ("attention_mask", "segment_ids")  # batch keys passed on to the model when present


def mask_tokens(
    input_ids: Tensor,
    *,
    vocab_size: int,
    mask_id: int = 4,
    special_ids: Sequence[int] = SPECIAL_IDS,
    mask_probability: float = 0.15,
    replace_with_mask: float = 0.8,
    replace_with_random: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's corruption (Devlin et al., 2019, section 3.1), a pure function of ``input_ids`` and the generator.

    Each token that is not special is selected independently with probability ``mask_probability``.
    A selected token is replaced by ``mask_id`` with probability ``replace_with_mask``, by a token drawn
    uniformly from the non-special ids with probability ``replace_with_random``, and kept otherwise.

    Args:
        input_ids: (B, T) int token ids.
        vocab_size: ids are ``0 .. vocab_size - 1``; random replacements come from the non-special ones.
        mask_id: the ``<mask>`` id.
        special_ids: ids never selected and never drawn as a random replacement (padding among them).
        mask_probability: chance that a non-special token is selected.
        replace_with_mask: chance that a selected token becomes ``mask_id``.
        replace_with_random: chance that a selected token becomes a random non-special token.
        generator: the random source, on ``input_ids``' device; None uses torch's global generator.

    Returns:
        ``(masked_ids, labels)``, both (B, T): the corrupted ids, and the original id at selected
        positions with -100 everywhere else.
    """
    device = input_ids.device
    special = torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype, device=device)
    candidates = ~torch.isin(input_ids, special)  # (B, T) tokens that may be selected
    draw = torch.rand(input_ids.shape, generator=generator, device=device)
    selected = candidates & (draw < mask_probability)  # (B, T)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    action = torch.rand(input_ids.shape, generator=generator, device=device)
    to_mask = selected & (action < replace_with_mask)
    to_random = selected & (action >= replace_with_mask) & (action < replace_with_mask + replace_with_random)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    if replace_with_random > 0:
        ordinary = torch.ones(vocab_size, dtype=torch.bool, device=device)
        ordinary[special[special < vocab_size]] = False
        ordinary_ids = ordinary.nonzero().squeeze(1)  # (V_ordinary,)
        pick = torch.randint(len(ordinary_ids), input_ids.shape, generator=generator, device=device)
        masked = torch.where(to_random, ordinary_ids[pick].to(input_ids.dtype), masked)
    return masked, labels


class MaskedLM(TrainingTask):
    """Masked-token cross-entropy, BERT's pre-training objective (Devlin et al., 2019).

    The task corrupts each batch's ``input_ids`` itself with :func:`mask_tokens` (any ``labels`` in
    the batch are ignored, so :class:`~lightningllm.data.TextDataModule` batches work as they are)
    and scores the model only on the selected positions. ``attention_mask`` and ``segment_ids`` of a
    batch, when present, are passed on to the model (for example :class:`lightningllm.models.Encoder`).

    Randomness: training masks come from torch's global generator (seeded by ``seed_everything``),
    so every step sees fresh masks. Validation and test masks come from a generator seeded with the
    batch index, so each evaluation scores the same corrupted batches and ``val/loss`` and
    ``val/masked_accuracy`` compare like with like across a run.

    Logs ``train/loss``, ``train/masked_accuracy``, ``val/loss``, ``val/masked_accuracy`` (the share
    of selected tokens whose original id is the model's top prediction), ``test/loss`` and
    ``test/masked_accuracy``.

    Args:
        model: the network, already built, mapping ids (B, T) to logits (B, T, vocab_size).
        optimizer: called with parameter groups; norms, biases and embeddings get no weight decay.
        mask_id: the ``<mask>`` id (4 in every lightningllm tokenizer).
        vocab_size: range of random replacement ids; None takes ``model.vocab_size``.
        mask_probability: share of non-special tokens selected for prediction.
        replace_with_mask: share of selected tokens replaced by ``mask_id``.
        replace_with_random: share of selected tokens replaced by a random non-special token
            (the rest stay unchanged).
        special_ids: ids never selected nor drawn as replacements (``<pad> <unk> <bos> <eos> <mask>``).
        warmup_steps: linear warmup from zero.
        schedule: decay after warmup, over the Trainer's total optimizer steps.
        min_lr_ratio: final learning rate as a fraction of the peak.
        activation_checkpointing: recompute each ``Block`` in the backward pass to save memory.
        compile: ``torch.compile`` each ``Block`` (names and exports unchanged).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        mask_id: int = 4,
        vocab_size: int | None = None,
        mask_probability: float = 0.15,
        replace_with_mask: float = 0.8,
        replace_with_random: float = 0.1,
        special_ids: Sequence[int] = SPECIAL_IDS,
        warmup_steps: int = 100,
        schedule: Schedule = "cosine",
        min_lr_ratio: float = 0.1,
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        save_hyperparameters(self, injected=("model", "optimizer"))
        check_model(model, "MaskedLM")
        self.ensure_token_head(model, "MaskedLM", head="MaskedLMHead")
        model_vocab_size = model.vocab_size
        if vocab_size is not None and vocab_size > model_vocab_size:
            raise ConfigError(
                f"MaskedLM vocab_size={vocab_size} exceeds the model's vocab_size={model_vocab_size}: random "
                "replacement ids past the embedding table cannot be looked up. Leave vocab_size unset (the model's "
                "is used) or lower it."
            )
        vocab_size = vocab_size if vocab_size is not None else model_vocab_size
        _check_masking(vocab_size, mask_id, mask_probability, replace_with_mask, replace_with_random, special_ids)
        self.init_training(model, optimizer, warmup_steps, schedule, min_lr_ratio, activation_checkpointing, compile)
        self.mask_id, self.vocab_size, self.special_ids = mask_id, vocab_size, tuple(special_ids)
        self.mask_probability = mask_probability
        self.replace_with_mask, self.replace_with_random = replace_with_mask, replace_with_random
        self.val_accuracy = MeanMetric()
        self.test_accuracy = MeanMetric()

    def setup(self, stage: str) -> None:
        tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is None:
            return
        if tokenizer.vocab_size > self.vocab_size:
            raise ConfigError(
                f"The tokenizer has {tokenizer.vocab_size} tokens but MaskedLM draws ids below vocab_size="
                f"{self.vocab_size}: token ids past the model's embedding table cannot be looked up. Set the "
                f"model's vocab_size to at least {tokenizer.vocab_size} (the CLI links data.vocab_size to it when "
                "you leave it out)."
            )
        if tokenizer.mask_id != self.mask_id:
            raise ConfigError(
                f"MaskedLM mask_id={self.mask_id}, but the tokenizer's <mask> token has id {tokenizer.mask_id}. "
                f"Set mask_id: {tokenizer.mask_id}."
            )

    def mask_tokens(self, input_ids: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """:func:`mask_tokens` with this task's settings. input_ids: (B, T) -> (masked_ids, labels), (B, T) each."""
        return mask_tokens(
            input_ids, vocab_size=self.vocab_size, mask_id=self.mask_id, special_ids=self.special_ids,
            mask_probability=self.mask_probability, replace_with_mask=self.replace_with_mask,
            replace_with_random=self.replace_with_random, generator=generator,
        )  # fmt: skip

    def forward(self, input_ids: Tensor, **model_inputs: Tensor) -> Tensor:
        """input_ids: (B, T) -> logits (B, T, vocab_size)."""
        return self.model(input_ids, **model_inputs)

    def loss(
        self, batch: dict[str, Tensor] | Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean cross-entropy over the selected positions (plus any auxiliary loss), the logits and the labels.

        Args:
            batch: ``{"input_ids": (B, T), ...}`` or a bare ids tensor (B, T).
            generator: the masks' random source (None: torch's global generator).
        """
        input_ids = batch["input_ids"] if isinstance(batch, dict) else batch
        model_inputs = {k: batch[k] for k in MODEL_INPUTS if isinstance(batch, dict) and k in batch}
        masked_ids, labels = self.mask_tokens(input_ids, generator=generator)
        logits = self.model(masked_ids, **model_inputs)  # (B, T, V)
        n_selected = (labels != IGNORE_INDEX).sum().clamp(min=1)  # 0 selected gives a loss of 0, not NaN
        summed = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return summed / n_selected + aux_loss(self.model), logits, labels

    def training_step(self, batch: dict[str, Tensor] | Tensor, batch_idx: int) -> Tensor:
        loss, logits, labels = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        correct = _correct(logits, labels)
        if correct.numel():
            self.log("train/masked_accuracy", correct.mean())
        return loss

    def validation_step(self, batch: dict[str, Tensor] | Tensor, batch_idx: int) -> None:
        self._evaluate("val", self.val_accuracy, batch, batch_idx)

    def test_step(self, batch: dict[str, Tensor] | Tensor, batch_idx: int) -> None:
        self._evaluate("test", self.test_accuracy, batch, batch_idx)

    def predict_step(self, batch: dict[str, Tensor] | Tensor, batch_idx: int) -> Tensor:
        """The most likely id at every position of the (uncorrupted) input, (B, T)."""
        input_ids = batch["input_ids"] if isinstance(batch, dict) else batch
        model_inputs = {k: batch[k] for k in MODEL_INPUTS if isinstance(batch, dict) and k in batch}
        return self.model(input_ids, **model_inputs).argmax(-1)

    def _evaluate(self, split: str, accuracy: MeanMetric, batch: dict[str, Tensor] | Tensor, batch_idx: int) -> None:
        input_ids = batch["input_ids"] if isinstance(batch, dict) else batch
        generator = torch.Generator(device=input_ids.device).manual_seed(batch_idx)
        loss, logits, labels = self.loss(batch, generator=generator)
        correct = _correct(logits, labels)
        if correct.numel():
            accuracy.update(correct)
        self.log(f"{split}/loss", loss, prog_bar=split == "val", sync_dist=True)
        self.log(f"{split}/masked_accuracy", accuracy)


def _correct(logits: Tensor, labels: Tensor) -> Tensor:
    """1.0 where the top prediction is the original id, over the selected positions only: (N_selected,)."""
    selected = labels != IGNORE_INDEX
    return (logits.argmax(-1)[selected] == labels[selected]).float()


def _check_masking(
    vocab_size: int | None,
    mask_id: int,
    mask_probability: float,
    replace_with_mask: float,
    replace_with_random: float,
    special_ids: Sequence[int],
) -> None:
    if vocab_size is None:
        raise ConfigError(
            "MaskedLM needs vocab_size to draw random replacement tokens, and the model has no vocab_size "
            "attribute. Pass vocab_size to MaskedLM."
        )
    if not 0 <= mask_id < vocab_size:
        raise ConfigError(f"MaskedLM mask_id={mask_id} is not an id of a vocabulary of {vocab_size} tokens.")
    if not 0.0 < mask_probability <= 1.0:
        raise ConfigError(
            f"MaskedLM mask_probability={mask_probability} must be in (0, 1]: the share of tokens to predict "
            "(BERT: 0.15)."
        )
    if replace_with_mask < 0 or replace_with_random < 0 or replace_with_mask + replace_with_random > 1:
        raise ConfigError(
            f"MaskedLM replace_with_mask={replace_with_mask} and replace_with_random={replace_with_random} are "
            "probabilities of disjoint outcomes for a selected token: each must be >= 0 and their sum at most 1 "
            "(BERT: 0.8 and 0.1, the remaining 0.1 kept unchanged)."
        )
    if replace_with_random > 0 and not set(range(vocab_size)) - set(special_ids):
        raise ConfigError(
            f"MaskedLM replace_with_random={replace_with_random} needs ordinary tokens to draw from, but every id "
            f"below vocab_size={vocab_size} is among special_ids={list(special_ids)}."
        )
