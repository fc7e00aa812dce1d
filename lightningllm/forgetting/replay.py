"""Replay and progressive training: a share of every fine-tuning batch's rows are pretraining windows."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightningllm.checks import check_int, check_number
from lightningllm.errors import ConfigError
from lightningllm.forgetting.data import PretrainingData
from lightningllm.forgetting.terms import attach


class ReplayMix(L.Callback):
    """The mechanism of :class:`Replay` and :class:`ProgressiveTraining`: a batch of ``B`` rows keeps its first
    ``B - n`` fine-tuning rows and gets ``n`` random training windows of the pretraining corpus.

    ``n`` follows the replay share of the current step (:meth:`replay_share`), carrying the fractions from
    step to step, so over many batches the share of replayed rows is the configured one (and each batch is
    at most one row off). The loss is the mean over the mixed rows, replayed rows weighted by ``weight``::

        loss = ((B - n) * task_loss + weight * n * pretraining_loss) / B

    (``task_loss`` is the task's own loss on its ``B - n`` rows; a batch of no fine-tuning row skips it.) The
    pretraining loss is :meth:`PretrainingData.loss`: the model's own token head, or the start export's LM head
    for a classifier. Logs ``train/replay_loss`` and ``train/replay_share``.

    Args:
        data: the pretraining corpus of the start export.
        weight: weight of a replayed row's loss against a fine-tuning row's (>= 0).
        seed: seed of the replayed windows.
    """

    def __init__(self, data: PretrainingData, weight: float = 1.0, seed: int = 0) -> None:
        check_number(type(self).__name__, "weight", weight, 0.0, extra="(the weight of a replayed row's loss)")
        check_int(type(self).__name__, "seed", seed)
        self.data, self.weight = data, weight
        self._generator = torch.Generator().manual_seed(seed)
        self._owed = 0.0  # replayed rows owed by the shares of earlier batches (< 1)

    def replay_share(self, progress: float) -> float:
        """The share of replayed rows at ``progress`` (0 at the first optimizer step, 1 at the last)."""
        raise NotImplementedError

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            attach(pl_module, self)

    def __call__(self, task, step, batch: Any) -> Tensor:
        rows = _n_rows(batch)
        share = self.replay_share(_progress(task.trainer))
        self._owed += share * rows
        n = min(int(self._owed + 1e-9), rows)  # 1e-9: 0.3 * 10 adds up to 2.9999999999999996
        self._owed -= n
        task.log("train/replay_share", share)
        if n == 0:
            return step(batch)
        windows = self.data.windows("train", torch.randint(len(self.data.dataset("train")), (n,),
                                                           generator=self._generator))  # fmt: skip
        replay_loss = self.data.loss(task.model, {k: v.to(task.device) for k, v in windows.items()})
        task.log("train/replay_loss", replay_loss)
        mixed = self.weight * n * replay_loss
        if n < rows:
            mixed = mixed + (rows - n) * step(first_rows(batch, rows - n, rows))
        return mixed / rows


class Replay(ReplayMix):
    """Experience replay (Robins, 1995; Chaudhry et al., 2019, "On Tiny Episodic Memories in Continual
    Learning"): a fixed share of every fine-tuning batch's rows are pretraining windows (see :class:`ReplayMix`).

    Args:
        data: the pretraining corpus of the start export.
        share: the fraction of each batch's rows that are pretraining windows, in [0, 1).
        weight: weight of a replayed row's loss (>= 0).
        seed: seed of the replayed windows.
    """

    def __init__(self, data: PretrainingData, share: float = 0.25, weight: float = 1.0, seed: int = 0) -> None:
        check_number("Replay", "share", share, 0.0, 1.0, high_open=True,
                     extra="(the share of rows replayed; 1 would train no new row)")  # fmt: skip
        super().__init__(data, weight, seed)
        self.share = share

    def replay_share(self, progress: float) -> float:
        return self.share


class ProgressiveTraining(ReplayMix):
    """Progressive training: the share of new-task rows in each batch rises linearly from ``start`` at the first
    optimizer step to ``end`` at the last; the other rows are pretraining windows (see :class:`ReplayMix`).

    Args:
        data: the pretraining corpus of the start export.
        start: the new-task share of the first step, in (0, 1].
        end: the new-task share of the last step, in (0, 1] (1: the run ends on new-task data only).
        weight: weight of a replayed row's loss (>= 0).
        seed: seed of the replayed windows.
    """

    def __init__(
        self, data: PretrainingData, start: float = 0.5, end: float = 1.0, weight: float = 1.0, seed: int = 0
    ) -> None:
        for name, value in (("start", start), ("end", end)):
            check_number("ProgressiveTraining", name, value, 0.0, 1.0,
                         extra="above 0 (the share of new-task rows in a batch)")  # fmt: skip
            if value == 0.0:
                raise ConfigError(
                    f"ProgressiveTraining {name}=0 is not allowed: a batch without new-task rows trains only on "
                    "pretraining data. Give a share of new-task rows in (0, 1]."
                )
        super().__init__(data, weight, seed)
        self.start, self.end = start, end

    def replay_share(self, progress: float) -> float:
        return 1.0 - (self.start + (self.end - self.start) * progress)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and not math.isfinite(trainer.estimated_stepping_batches):
            raise ConfigError(
                "ProgressiveTraining schedules the new-task share over the run's optimizer steps, but the run has "
                "no end (max_steps and max_epochs unset). Set trainer.max_steps or trainer.max_epochs."
            )


def _progress(trainer: L.Trainer) -> float:
    """0 at the first optimizer step of the run, 1 at its last."""
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total) or total <= 1:
        return 0.0
    return min(trainer.global_step / (total - 1), 1.0)


def _n_rows(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, dict) and isinstance(batch.get("input_ids"), Tensor):
        return batch["input_ids"].shape[0]
    raise ConfigError(
        f"Replay mixes pretraining windows into batches of rows (a tensor, or a dict with input_ids), but the "
        f"task's batch is a {type(batch).__name__}. Remove the replay callback for this task."
    )


def first_rows(batch: Any, n: int, rows: int) -> Any:
    """The first ``n`` of the ``rows`` rows of a batch: every tensor or list with ``rows`` entries is cut."""
    if isinstance(batch, dict):
        return {key: first_rows(value, n, rows) for key, value in batch.items()}
    if isinstance(batch, Tensor) and batch.ndim > 0 and batch.shape[0] == rows:
        return batch[:n]
    if isinstance(batch, (list, tuple)) and len(batch) == rows:
        return batch[:n]
    return batch
