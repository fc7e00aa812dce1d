"""What a run prints while it trains: a step progress bar and a parameter summary.

Lightning's defaults count batches per epoch ("Epoch 0/-2" when only ``max_steps`` bounds the run),
show ``v_num`` and every metric logged with ``prog_bar=True`` under truncated names, and summarise
the model with a FLOP count that is 0 unless the task sets an ``example_input_array``. A language
model run is bounded by optimizer steps, so the bar counts those.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, _update_n
from lightning.pytorch.utilities.model_summary import get_human_readable_count

log = logging.getLogger(__name__)

# logged metric -> name on the bar; tokens/s is measured by the bar when the task does not log it
SHOWN = {"train/loss": "loss", "val/loss": "val_loss", "train/tokens_per_sec": "tok/s"}


class StepProgressBar(TQDMProgressBar):
    """One bar over the optimizer steps of the whole run: ``step 120/800``, loss, val_loss and tok/s.

    The total is ``max_steps`` (or the Trainer's estimate of the run's steps when only epochs bound it),
    a resumed run starts at its step, and epochs do not reset the bar. Tokens per second is the task's
    ``train/tokens_per_sec`` when it logs one; otherwise the bar measures it from the batches' token ids
    (the ``input_ids`` of a dict batch, or a bare tensor) over the steps between refreshes.

    Args:
        refresh_rate: refresh the bar every this many steps.
    """

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._tokens = 0
        self._since: float | None = None
        self._tokens_per_sec: float | None = None

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(desc="step", position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)  # fmt: skip

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=total_steps(trainer))
        self.train_progress_bar.n = self.train_progress_bar.initial = trainer.global_step
        self._since = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar over the run's steps: epochs do not reset it

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self._tokens += batch_tokens(batch) * trainer.world_size
        step = trainer.global_step
        if self.train_progress_bar is None or not self._should_update(step, self.train_progress_bar.total):
            return
        now = time.perf_counter()
        if self._since is not None and now > self._since and self._tokens:
            self._tokens_per_sec = self._tokens / (now - self._since)
        self._tokens, self._since = 0, now
        _update_n(self.train_progress_bar, step)
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float]:
        """loss, val_loss and tok/s, the ones known so far, for the bar's postfix."""
        metrics = {**trainer.callback_metrics, **trainer.progress_bar_metrics}
        if "train/tokens_per_sec" not in metrics and self._tokens_per_sec is not None:
            metrics["train/tokens_per_sec"] = self._tokens_per_sec
        shown: dict[str, int | str | float] = {}
        for key, name in SHOWN.items():
            if key in metrics:
                value = float(metrics[key])
                shown[name] = f"{value:.0f}" if name == "tok/s" else f"{value:.4f}"
        return shown


def total_steps(trainer: L.Trainer) -> int | None:
    """The optimizer steps the run will take: ``max_steps``, else the Trainer's estimate (None if unbounded)."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return trainer.max_steps
    estimate = trainer.estimated_stepping_batches
    return int(estimate) if estimate != float("inf") else None


def batch_tokens(batch: Any) -> int:
    """Token ids in a batch: its ``input_ids`` (a dict batch) or the tensor itself; 0 when there is neither."""
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch
    return ids.numel() if isinstance(ids, torch.Tensor) else 0


class ParameterSummary(ModelSummary):
    """The model's top-level modules with their parameter counts, without Lightning's FLOP column.

    Lightning counts FLOPs only when the module has an ``example_input_array`` and prints 0 otherwise;
    ``lightningllm estimate`` gives the training FLOPs of a configuration instead.
    """

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int = 0,
                  **summarize_kwargs: Any) -> None:  # fmt: skip
        columns = dict(summary_data)
        rows = zip(columns.get("Name", []), columns.get("Type", []), columns.get("Params", []), strict=False)
        lines = [f"  {name:<24} {kind:<24} {params:>8}" for name, kind, params in rows]
        lines.append(
            f"  {get_human_readable_count(total_parameters)} parameters "
            f"({get_human_readable_count(trainable_parameters)} trainable), {model_size:.1f} MB"
        )
        log.info("Model:\n%s", "\n".join(lines))


def default_callbacks(callbacks: list[L.Callback], enable_progress_bar: bool | None = True,
                      enable_model_summary: bool | None = True) -> list[L.Callback]:  # fmt: skip
    """``callbacks`` and, unless the run has its own or turned them off, the step bar, the parameter summary and
    the :class:`~lightningllm.run_summary.RunSummary` (the defaults of the ``lightningllm`` command)."""
    from lightning.pytorch.callbacks import ProgressBar

    from lightningllm.run_summary import RunSummary

    added: list[L.Callback] = []
    if enable_progress_bar is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
        added.append(StepProgressBar())
    if enable_model_summary is not False and not any(isinstance(c, ModelSummary) for c in callbacks):
        added.append(ParameterSummary())
    if not any(isinstance(c, RunSummary) for c in callbacks):
        added.append(RunSummary())
    return [*callbacks, *added]
