"""Sequence classification: one label per text, from a backbone's pooled hidden states."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from lightningllm.contracts import check_model
from lightningllm.errors import ConfigError
from lightningllm.hparams import save_hyperparameters
from lightningllm.lifecycle import build_transform
from lightningllm.mask import AttentionMask
from lightningllm.pooling import Pooling, check_pooling
from lightningllm.registry import get
from lightningllm.tasks.base import TrainingTask
from lightningllm.tasks.confusion import save_confusion_png
from lightningllm.tasks.optim import Schedule

log = logging.getLogger(__name__)

CONFUSION_PNG = "confusion_matrix.png"


class SequenceClassification(TrainingTask):
    """Cross-entropy over the class logits of a backbone (Decoder, Encoder) with a ``ClassificationHead``.

    The head pools the backbone's final hidden states over the real tokens (see
    :func:`lightningllm.pooling.pool`) and projects them to the classes. It comes from the model's config
    (``head: {class_path: ClassificationHead, init_args: {n_classes: 3}}``, loaded from the start weights when
    they hold the same head); a model with another head (the LM head of a pretrained export) gets a fresh
    ``ClassificationHead`` with this task's ``pooling`` and ``dropout``, and the log says so. Freezing is the
    model's ``Freeze`` transform (``train: head`` trains the head only); it is applied again after a head
    replacement, so a head tied to the embedding does not leave the embedding trainable.

    The class names are ``classes`` if set, else the head's recorded ``labels``, else the data module's
    ``label_names`` (:class:`~lightningllm.data.ClassificationDataModule`); where several are given they must
    agree. They are written into the head's config, so the export and the checkpoint name the classes and
    predictions are labelled.

    Batches are ``{"input_ids": (B, T), "attention_mask": (B, T) bool, "labels": (B,)}`` (any padding side).

    Logs ``train/loss``, ``val/loss``, ``val/accuracy`` (micro), ``val/macro_f1`` (the unweighted mean of the
    per-class F1, so a small class counts as much as a large one) and the same under ``test/``. At the end of
    each validation the confusion matrix is drawn to ``confusion_matrix.png`` in the logger's folder (rows:
    true class, columns: predicted); at the start of ``fit`` the log gives the majority-class baseline.

    Args:
        model: the backbone, already built (with its start weights and transforms).
        optimizer: called with parameter groups; norms, biases and embeddings get no weight decay.
        classes: the class names in class-id order; None takes the head's or the data module's.
        pooling: pooling of a head this task creates; None: "last" for a causal backbone (only its last token
            has read the whole row), "first" for a bidirectional one (the ``<bos>``/[CLS] position).
        dropout: dropout on the pooled vector of a head this task creates.
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
        class_weights: list[float] | Literal["balanced"] | None = None,
        warmup_steps: int = 20,
        schedule: Schedule = "cosine",
        min_lr_ratio: float = 0.1,
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        check_model(model, "SequenceClassification")
        _check_options(model, classes, pooling, dropout, class_weights)
        save_hyperparameters(self, injected=("model", "optimizer"))
        self.init_training(model, optimizer, warmup_steps, schedule, min_lr_ratio, activation_checkpointing, compile)
        self.pooling: Pooling = pooling or ("last" if model.causal else "first")
        self.dropout, self.class_weights = dropout, class_weights
        self.label_names: list[str] | None = None
        names = classes if classes is not None else getattr(model.head, "labels", None)
        if names is not None:
            self._build(list(names))

    # --- classes, head and metrics -------------------------------------------------------------
    def _build(self, names: list[str]) -> None:
        """Fit the model's head to ``names`` and create the metrics (once)."""
        self._fit_head(names)
        self.label_names = names
        self.hparams["classes"] = names  # load_from_checkpoint fits the head before loading its weights
        n = len(names)
        for split in ("val", "test"):
            setattr(self, f"{split}_accuracy", MulticlassAccuracy(n, average="micro"))
            setattr(self, f"{split}_macro_f1", MulticlassF1Score(n, average="macro"))
            setattr(self, f"{split}_confusion", MulticlassConfusionMatrix(n))
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("SequenceClassification: %d classes (%s), %s pooling, %d of %d parameters train", n,
                 ", ".join(names), self.model.head.pooling, trainable,
                 sum(p.numel() for p in self.model.parameters()))  # fmt: skip

    def _fit_head(self, names: list[str]) -> None:
        classification_head = get("head", "ClassificationHead")
        head = self.model.head
        if not isinstance(head, classification_head):
            factory = partial(classification_head, n_classes=len(names), pooling=self.pooling, dropout=self.dropout)
            head = self.model.replace_head(factory, reason="SequenceClassification needs class logits")
            self._freeze_again()
        elif head.n_classes != len(names):
            raise ConfigError(
                f"The model's ClassificationHead has n_classes={head.n_classes}, but there are {len(names)} classes "
                f"({', '.join(names)}). Set the head's n_classes to {len(names)}, or leave the head out of the model "
                "config and let SequenceClassification create it."
            )
        elif head.labels is not None and list(head.labels) != names:
            raise ConfigError(
                f"The model's ClassificationHead was trained for the classes {list(head.labels)}, not {names}: class "
                "ids would mean different classes. Give the data the same classes in the same order."
            )
        elif self.hparams.get("pooling") not in (None, head.pooling):
            raise ConfigError(
                f"SequenceClassification pooling={self.hparams['pooling']!r}, but the model's ClassificationHead pools "
                f"{head.pooling!r}. Set the pooling on the head (the task's pooling applies to a head it creates)."
            )
        head.labels = names
        self.model.config["head"] = {**self.model.config["head"], "init_args": {
            **(self.model.config["head"].get("init_args") or {}), "labels": names}}  # fmt: skip

    def _freeze_again(self) -> None:
        """Re-apply the model's Freeze transforms: they chose the trainable parameters before the head changed."""
        for spec in self.model.config.get("transforms") or []:
            if spec["class_path"].rsplit(".", 1)[-1] == "Freeze":
                build_transform(spec).apply(self.model)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_labels = getattr(datamodule, "label_names", None)
        if self.label_names is None:
            if data_labels is None:
                raise ConfigError(
                    "SequenceClassification does not know its classes: set classes (the class names in class-id "
                    "order), give the model's ClassificationHead labels, or use a data module with label_names such "
                    "as ClassificationDataModule."
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

    # --- forward and loss ------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids: (B, T), attention_mask: (B, T) bool (True at real tokens) -> class logits (B, C)."""
        padding = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        hidden = _hidden_states(self.model, input_ids, padding)  # (B, T, dim)
        return self.model.head(hidden, padding=padding)  # (B, C)

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Mean (class-weighted) cross-entropy and the logits (B, C)."""
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        weights = getattr(self, "_weights", None)
        weights = weights.to(logits.device) if weights is not None else None
        return F.cross_entropy(logits.float(), batch["labels"], weight=weights), logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
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
        scores = confusion_scores(matrix)
        log.info("%s at step %d: accuracy %.4f, macro F1 %.4f (%d examples); confusion matrix %s", split,
                 self.global_step, scores["accuracy"], scores["macro_f1"], int(matrix.sum()), path)  # fmt: skip


def confusion_scores(matrix: Tensor) -> dict[str, float]:
    """Accuracy and macro F1 from a (C, C) confusion matrix (rows true, columns predicted; a class's F1 is 0
    when it has no true positive)."""
    matrix = matrix.double()
    tp = matrix.diag()
    f1 = 2 * tp / (matrix.sum(0) + matrix.sum(1)).clamp(min=1)  # 2TP / (2TP + FP + FN)
    return {"accuracy": float(tp.sum() / matrix.sum().clamp(min=1)), "macro_f1": float(f1.mean())}


def majority_baseline(train_labels: Tensor, val_labels: Tensor, n_classes: int) -> dict[str, float | int]:
    """Accuracy and macro F1 on ``val_labels`` (N,) of always predicting the most frequent class of ``train_labels``."""
    majority = int(torch.bincount(train_labels, minlength=n_classes).argmax())
    predictions = torch.full_like(val_labels, majority)
    accuracy = MulticlassAccuracy(n_classes, average="micro")(predictions, val_labels)
    macro_f1 = MulticlassF1Score(n_classes, average="macro")(predictions, val_labels)
    return {"class": majority, "accuracy": float(accuracy), "macro_f1": float(macro_f1)}


def _hidden_states(model: nn.Module, input_ids: Tensor, padding: Tensor) -> Tensor:
    """(B, T) ids with their padding -> (B, T, dim), for a causal or a bidirectional backbone."""
    # a causal query never sees the pads after it: right-padded rows keep the fast plain-causal kernel
    right_padded = model.causal and bool((padding[:, 1:] <= padding[:, :-1]).all())
    mask = AttentionMask(causal=model.causal, padding=None if right_padded else padding)
    return model.hidden_states(input_ids, mask=mask)


def _check_options(model, classes, pooling, dropout, class_weights) -> None:
    if classes is not None and (len(classes) < 2 or len(set(classes)) != len(classes)):
        raise ConfigError(f"SequenceClassification classes={classes!r} must be at least two distinct class names.")
    if pooling is not None:
        check_pooling(pooling, "SequenceClassification")
    if pooling == "first" and model.causal:
        raise ConfigError(
            f"SequenceClassification pooling='first' on the causal {type(model).__name__}: its first token has read "
            "only itself, so every row would look alike. Use 'last' or 'mean' with a causal backbone."
        )
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"SequenceClassification dropout={dropout!r} must be in [0, 1).")
    if isinstance(class_weights, str) and class_weights != "balanced":
        raise ConfigError(
            f"SequenceClassification class_weights={class_weights!r} is not allowed: give one weight per class, "
            "'balanced', or null."
        )
    if isinstance(class_weights, list) and any(w < 0 for w in class_weights):
        raise ConfigError(f"SequenceClassification class_weights={class_weights!r} must be >= 0.")
