"""Sequence classification: one label per text, from a backbone's pooled hidden states."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from lightningllm.errors import ConfigError
from lightningllm.hparams import save_hyperparameters
from lightningllm.mask import AttentionMask
from lightningllm.tasks.base import TrainingTask
from lightningllm.tasks.confusion import save_confusion_png
from lightningllm.tasks.optim import Schedule

log = logging.getLogger(__name__)

Pooling = Literal["last", "first", "mean"]
Trainable = Literal["all", "head"]
CONFUSION_PNG = "confusion_matrix.png"


def pool(hidden: Tensor, padding: Tensor, pooling: Pooling) -> Tensor:
    """One vector per row out of its real tokens.

    Args:
        hidden: (B, T, dim) final hidden states.
        padding: (B, T) bool, True at real tokens; rows may be padded on either side.
        pooling: "last": the last real token (a causal model's summary of the whole row); "first": the first
            real token (an encoder's [CLS]/``<bos>``); "mean": the mean over the real tokens.

    Returns:
        (B, dim).
    """
    padding = padding.to(torch.bool)
    positions = torch.arange(hidden.shape[1], device=hidden.device)  # (T,)
    if pooling == "mean":
        weights = padding.to(hidden.dtype)[..., None]  # (B, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    if pooling == "last":
        index = torch.where(padding, positions, -1).amax(1)  # (B,)
    else:
        index = torch.where(padding, positions, hidden.shape[1]).amin(1)  # (B,)
    index = index.clamp(0, hidden.shape[1] - 1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (B, dim)


class PooledLinear(nn.Module):
    """Pool the real tokens, dropout, then a linear layer to the class logits.

    Args:
        dim: width of the hidden states.
        n_classes: number of classes (C).
        pooling: see :func:`pool`.
        dropout: dropout on the pooled vector.
    """

    def __init__(self, dim: int, n_classes: int, pooling: Pooling, dropout: float) -> None:
        super().__init__()
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, n_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor, *, padding: Tensor) -> Tensor:
        """hidden: (B, T, dim), padding: (B, T) bool -> class logits (B, C)."""
        return self.proj(self.dropout(pool(hidden, padding, self.pooling)))


class SequenceClassification(TrainingTask):
    """Cross-entropy over class logits pooled from any backbone (Decoder, Encoder) with a ``hidden_states`` method.

    The class names come from ``classes`` or, when that is unset, from the data module's ``label_names``
    (:class:`~lightningllm.data.ClassificationDataModule`), and are recorded in the checkpoint's
    hyperparameters, so predictions name their classes. The head (pooling, dropout, a linear layer to the
    classes) is built fresh.

    Batches are ``{"input_ids": (B, T), "attention_mask": (B, T) bool, "labels": (B,)}`` right-padded.

    Logs ``train/loss``, ``val/loss``, ``val/accuracy`` (micro), ``val/macro_f1`` (the unweighted mean of the
    per-class F1, so a small class counts as much as a large one) and the same under ``test/``. At the end of
    each validation the confusion matrix is drawn to ``confusion_matrix.png`` in the logger's folder (rows:
    true class, columns: predicted).

    Args:
        model: the backbone, already built (with its start weights).
        optimizer: called with parameter groups; norms, biases and embeddings get no weight decay.
        classes: the class names in class-id order; None takes the data module's ``label_names``.
        pooling: how a row becomes one vector; None: "last" for a causal backbone (only its last token has
            read the whole row), "first" for a bidirectional one (the ``<bos>``/[CLS] position).
        dropout: dropout on the pooled vector.
        trainable: "all" fine-tunes everything; "head" freezes the backbone and trains the head only.
        class_weights: per-class loss weights in class-id order; "balanced" weighs each class by
            ``n_examples / (n_classes * n_examples_of_class)`` in the training data; None: equal.
        warmup_steps: linear warmup from zero.
        schedule: decay after warmup, over the Trainer's total optimizer steps.
        min_lr_ratio: final learning rate as a fraction of the peak.
        activation_checkpointing: recompute each ``Block`` in the backward pass to save memory.
        compile: ``torch.compile`` each ``Block``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        classes: list[str] | None = None,
        pooling: Pooling | None = None,
        dropout: float = 0.0,
        trainable: Trainable = "all",
        class_weights: list[float] | Literal["balanced"] | None = None,
        warmup_steps: int = 20,
        schedule: Schedule = "cosine",
        min_lr_ratio: float = 0.1,
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        _check_options(model, classes, pooling, dropout, trainable, class_weights)
        save_hyperparameters(self, injected=("model", "optimizer"))
        self.init_training(model, optimizer, warmup_steps, schedule, min_lr_ratio, activation_checkpointing, compile)
        self.pooling: Pooling = pooling or ("last" if getattr(model, "causal", True) else "first")
        self.dropout, self.trainable, self.class_weights = dropout, trainable, class_weights
        self.label_names: list[str] | None = None
        self.head: PooledLinear | None = None
        if classes is not None:
            self._build(list(classes))

    # --- classes, head and metrics -------------------------------------------------------------
    def _build(self, labels: list[str]) -> None:
        """Create the head and the metrics for ``labels`` (once)."""
        self.label_names = labels
        self.hparams["classes"] = labels  # load_from_checkpoint rebuilds the head before loading its weights
        n = len(labels)
        self.head = PooledLinear(self.model.dim, n, self.pooling, self.dropout)
        for split in ("val", "test"):
            setattr(self, f"{split}_accuracy", MulticlassAccuracy(n, average="micro"))
            setattr(self, f"{split}_macro_f1", MulticlassF1Score(n, average="macro"))
            setattr(self, f"{split}_confusion", MulticlassConfusionMatrix(n))
        if self.trainable == "head":
            self.model.requires_grad_(False)
        log.info("SequenceClassification: %d classes (%s), %s pooling, training %s", n, ", ".join(labels),
                 self.pooling, "the head only" if self.trainable == "head" else "everything")  # fmt: skip

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_labels = getattr(datamodule, "label_names", None)
        if self.label_names is None:
            if data_labels is None:
                raise ConfigError(
                    "SequenceClassification does not know its classes: set classes (the class names in class-id "
                    "order), or use a data module with label_names such as ClassificationDataModule."
                )
            self._build(list(data_labels))
        elif data_labels is not None and list(data_labels) != self.label_names:
            raise ConfigError(
                f"SequenceClassification classes={self.label_names} differ from the data's classes "
                f"{list(data_labels)}: class ids would mean different classes. Leave classes unset to take the data's, "
                "or give the data module the same labels in the same order."
            )
        self._check_lengths(datamodule)
        if stage == "fit":
            self._weights = self._loss_weights(datamodule)
            self._log_majority_baseline(datamodule)

    def _log_majority_baseline(self, datamodule) -> None:
        """What always answering the most frequent training class scores on validation: the floor to beat."""
        datasets = getattr(datamodule, "datasets", {})
        if "train" not in datasets or "val" not in datasets:
            return
        n = len(self.label_names)
        train, val = torch.tensor(datasets["train"].labels), torch.tensor(datasets["val"].labels)
        baseline = majority_baseline(train, val, n)
        log.info("Majority-class baseline (always %r): val accuracy %.4f, val macro F1 %.4f",
                 self.label_names[baseline["class"]], baseline["accuracy"], baseline["macro_f1"])  # fmt: skip

    def _check_lengths(self, datamodule) -> None:
        max_length, max_seq_len = getattr(datamodule, "max_length", None), getattr(self.model, "max_seq_len", None)
        if max_length is not None and max_seq_len is not None and max_length > max_seq_len:
            raise ConfigError(
                f"The data's max_length={max_length} exceeds the model's max_seq_len={max_seq_len}: rows that long "
                f"have no position embedding. Set the data module's max_length to at most {max_seq_len}."
            )

    def _loss_weights(self, datamodule) -> Tensor | None:
        if self.class_weights is None:
            return None
        n = len(self.label_names)
        if self.class_weights == "balanced":
            labels = torch.tensor(datamodule.datasets["train"].labels) if datamodule is not None else None
            if labels is None:
                raise ConfigError("class_weights='balanced' needs the training labels of a ClassificationDataModule.")
            counts = torch.bincount(labels, minlength=n).float()
            weights = len(labels) / (n * counts.clamp(min=1))
        else:
            if len(self.class_weights) != n:
                raise ConfigError(
                    f"class_weights has {len(self.class_weights)} values but there are {n} classes "
                    f"({', '.join(self.label_names)}): give one weight per class, in class-id order."
                )
            weights = torch.tensor(self.class_weights, dtype=torch.float)
        log.info("Class weights: %s", dict(zip(self.label_names, [round(w, 4) for w in weights.tolist()])))
        return weights

    def configure_optimizers(self):
        if self.head is None:
            raise ConfigError("SequenceClassification has no head yet: its classes are unknown (set classes).")
        return self.optimizers_for(nn.ModuleList([self.model, self.head]))

    # --- forward and loss ------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids: (B, T), attention_mask: (B, T) bool (True at real tokens) -> class logits (B, C)."""
        padding = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        hidden = _hidden_states(self.model, input_ids, padding)  # (B, T, dim)
        return self.head(hidden, padding=padding)

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Mean (class-weighted) cross-entropy and the logits (B, C)."""
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        weights = getattr(self, "_weights", None)
        weights = weights.to(logits.device) if weights is not None else None
        return F.cross_entropy(logits.float(), batch["labels"], weight=weights), logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.trainable == "head":
            self.model.eval()  # a frozen backbone also keeps its dropout off
        loss, _ = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate("test", batch)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """``{"probabilities": (B, C), "index": (B,), "labels": (B,)}`` (labels -1 where the text had none)."""
        probabilities = self(batch["input_ids"], batch.get("attention_mask")).float().softmax(-1)
        return {"probabilities": probabilities, "index": batch["index"], "labels": batch["labels"]}

    def _evaluate(self, split: str, batch: dict[str, Tensor]) -> None:
        loss, logits = self.loss(batch)
        predictions, labels = logits.argmax(-1), batch["labels"]
        for name in ("accuracy", "macro_f1"):
            metric = getattr(self, f"{split}_{name}")
            metric(predictions, labels)
            self.log(f"{split}/{name}", metric, prog_bar=name == "accuracy")
        getattr(self, f"{split}_confusion").update(predictions, labels)
        self.log(f"{split}/loss", loss, prog_bar=split == "val", sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        self.val_confusion.reset()  # here, not after compute: in the grad mode the updates run in

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()

    def on_validation_epoch_end(self) -> None:
        self._confusion_end("val")

    def on_test_epoch_end(self) -> None:
        self._confusion_end("test")

    def _confusion_end(self, split: str) -> None:
        confusion = getattr(self, f"{split}_confusion")
        matrix = confusion.compute()  # synced over ranks
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        folder = self.trainer.log_dir or self.trainer.default_root_dir
        name = CONFUSION_PNG if split == "val" else f"{split}_{CONFUSION_PNG}"
        title = f"{split}, step {self.global_step}"
        path = save_confusion_png(matrix, self.label_names, Path(folder) / name, title=title)
        log.debug("Confusion matrix %s", path)


def majority_baseline(train_labels: Tensor, val_labels: Tensor, n_classes: int) -> dict[str, float | int]:
    """Accuracy and macro F1 on ``val_labels`` (N,) of always predicting the most frequent class of ``train_labels``."""
    majority = int(torch.bincount(train_labels, minlength=n_classes).argmax())
    predictions = torch.full_like(val_labels, majority)
    accuracy = MulticlassAccuracy(n_classes, average="micro")(predictions, val_labels)
    macro_f1 = MulticlassF1Score(n_classes, average="macro")(predictions, val_labels)
    return {"class": majority, "accuracy": float(accuracy), "macro_f1": float(macro_f1)}


def _hidden_states(model: nn.Module, input_ids: Tensor, padding: Tensor) -> Tensor:
    """(B, T) ids with their padding -> (B, T, dim), for a causal or a bidirectional backbone."""
    if getattr(model, "causal", True):
        # right padding: a causal query never sees the pads after it, so the fast causal kernel applies
        right_padded = bool((padding[:, 1:] <= padding[:, :-1]).all())
        mask = AttentionMask(causal=True, padding=None if right_padded else padding)
        return model.hidden_states(input_ids, mask=mask)
    return model.hidden_states(input_ids, attention_mask=padding)


def _check_options(model, classes, pooling, dropout, trainable, class_weights) -> None:
    if not hasattr(model, "hidden_states") or not hasattr(model, "dim"):
        raise ConfigError(
            f"SequenceClassification needs a backbone with hidden_states and dim (Decoder, Encoder); "
            f"{type(model).__name__} has not."
        )
    if classes is not None and (len(classes) < 2 or len(set(classes)) != len(classes)):
        raise ConfigError(f"SequenceClassification classes={classes!r} must be at least two distinct class names.")
    if pooling not in (None, "last", "first", "mean"):
        raise ConfigError(f"SequenceClassification pooling={pooling!r} is not one of 'last', 'first', 'mean'.")
    if pooling == "last" and not getattr(model, "causal", True):
        log.warning("pooling='last' on a bidirectional model: every position has read the whole row anyway")
    if pooling == "first" and getattr(model, "causal", True):
        raise ConfigError(
            f"SequenceClassification pooling='first' on the causal {type(model).__name__}: its first token has read "
            "only itself, so every row would look alike. Use 'last' or 'mean' with a causal backbone."
        )
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"SequenceClassification dropout={dropout!r} must be in [0, 1).")
    if trainable not in ("all", "head"):
        raise ConfigError(
            f"SequenceClassification trainable={trainable!r} is not allowed: 'all' fine-tunes everything, 'head' "
            "trains the classification head on a frozen backbone."
        )
    if isinstance(class_weights, str) and class_weights != "balanced":
        raise ConfigError(
            f"SequenceClassification class_weights={class_weights!r} is not allowed: give one weight per class, "
            "'balanced', or null."
        )
    if isinstance(class_weights, list) and any(w < 0 for w in class_weights):
        raise ConfigError(f"SequenceClassification class_weights={class_weights!r} must be >= 0.")
