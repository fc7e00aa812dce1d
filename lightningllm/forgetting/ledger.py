"""The forgetting ledger: the pretraining loss on held-out text when fine-tuning starts and when it ends."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightningllm.checks import check_int
from lightningllm.forgetting.data import PretrainingData


class ForgettingLedger(L.Callback):
    """Log the loss of the model on the start export's held-out pretraining text when ``fit`` starts and ends.

    The held-out windows are the first ``n_batches`` batches of the documents the pretraining run held out
    (:class:`PretrainingData`), scored as :meth:`PretrainingData.loss` does (the model's token head, or the
    start export's LM head for a classifier), token-weighted, in the Trainer's precision. The loggers get
    ``forgetting/pretrain_loss_start``, ``forgetting/pretrain_loss_end`` and ``forgetting/pretrain_loss_increase``
    (end minus start: how much was forgotten), and the log prints one line. A resumed run keeps the loss of
    the run's real start (it is saved in the checkpoint).

    Args:
        data: the pretraining corpus of the start export.
        n_batches: held-out batches scored (>= 1).
    """

    def __init__(self, data: PretrainingData, n_batches: int = 8) -> None:
        check_int("ForgettingLedger", "n_batches", n_batches, minimum=1)
        self.data, self.n_batches = data, n_batches
        self.start: float | None = None
        self.end: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.start is None:
            self.start = self.measure(trainer, pl_module)
            _log_metrics(trainer, {"forgetting/pretrain_loss_start": self.start})
            rank_zero_info(f"Forgetting ledger: pretraining loss {self.start:.4f} on held-out text before fine-tuning")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.end = self.measure(trainer, pl_module)
        increase = self.end - self.start
        _log_metrics(trainer, {"forgetting/pretrain_loss_end": self.end, "forgetting/pretrain_loss_increase": increase})
        rank_zero_info(f"Forgetting ledger: pretraining loss {self.start:.4f} -> {self.end:.4f} ({increase:+.4f}) "
                       f"on held-out text of {self.data.data.corpus!r}")  # fmt: skip

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """The token-weighted mean pretraining loss of the model on the held-out batches."""
        model = pl_module.model
        was_training = model.training
        model.eval()
        total, tokens = 0.0, 0
        try:
            for batch in self.data.held_out(self.n_batches):
                batch = {k: v.to(pl_module.device) for k, v in batch.items()}
                with trainer.precision_plugin.forward_context():
                    loss = self.data.loss(model, batch)
                n = int((batch["labels"] != -100).sum())
                total, tokens = total + float(loss) * n, tokens + n
        finally:
            model.train(was_training)
        return total / max(tokens, 1)

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start = state_dict["start"]


def _log_metrics(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()
