"""The end of a run: one summary (losses, checkpoint and export paths, wall time) and a loss-curve PNG."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lightningllm.atomic import atomic_file

log = logging.getLogger(__name__)

TRAIN_LOSS, VAL_LOSS = "train/loss", "val/loss"
PLOT_NAME = "loss.png"


class RunSummary(L.Callback):
    """Log a summary when ``fit`` ends and draw the loss curves beside the log.

    The summary (on rank 0 only) gives the best and the last validation loss with their steps, the
    checkpoint(s) written by ``ModelCheckpoint`` callbacks, the export folder of an ``Export``
    callback, the steps taken and the wall time. ``loss.png`` (train and validation loss against the
    optimizer step) goes to the Trainer's ``log_dir``, beside a CSVLogger's ``metrics.csv``; it needs
    matplotlib, and without it the plot is skipped with one log line. The losses are taken from the
    task's logged ``train/loss`` (every ``log_every_n_steps`` steps) and ``val/loss``.

    Args:
        plot: draw ``loss.png``.
    """

    def __init__(self, plot: bool = True) -> None:
        self.plot = plot
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self._started = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train, self.val, self._started = [], [], time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        step = trainer.global_step
        due = step % trainer.log_every_n_steps == 0 and (not self.train or self.train[-1][0] != step)
        if due and TRAIN_LOSS in trainer.callback_metrics:
            self.train.append((step, float(trainer.callback_metrics[TRAIN_LOSS])))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and VAL_LOSS in trainer.callback_metrics:
            self.val.append((trainer.global_step, float(trainer.callback_metrics[VAL_LOSS])))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP and FSDP: every rank must ask, or rank 0 waits for the others
        if not trainer.is_global_zero:
            return
        log.info("%s", self.summary(trainer, time.perf_counter() - self._started, log_dir))
        if self.plot and (self.train or self.val):
            plot_losses(self.train, self.val, Path(log_dir or trainer.default_root_dir) / PLOT_NAME)

    def summary(self, trainer: L.Trainer, seconds: float, log_dir: str | None = None) -> str:
        """The closing paragraph of a run, one fact per line (``log_dir``: the Trainer's, read on every rank)."""
        lines = [f"Run finished: {trainer.global_step} steps in {format_duration(seconds)}."]
        finite = [(step, loss) for step, loss in self.val if math.isfinite(loss)]
        if finite:
            best_step, best = min(finite, key=lambda item: item[1])
            last_step, last = self.val[-1]
            lines.append(f"  validation loss: best {best:.4f} (step {best_step}), last {last:.4f} (step {last_step})")
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint):
                path = callback.last_model_path or callback.best_model_path
                if path:
                    lines.append(f"  checkpoint: {path}")
            elif type(callback).__name__ == "Export" and Path(getattr(callback, "dirpath", "")).is_dir():
                lines.append(f"  export: {callback.dirpath}")
        if log_dir:
            lines.append(f"  logs: {log_dir}")
        return "\n".join(lines)


def format_duration(seconds: float) -> str:
    """``75.3`` -> ``"1 min 15 s"``; under a minute ``"4.2 s"``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min {rest} s" if hours else f"{minutes} min {rest} s"


def plot_losses(train: list[tuple[int, float]], val: list[tuple[int, float]], path: Path) -> Path | None:
    """Draw train and validation loss against the step into ``path`` (a PNG); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("Loss curve not drawn: matplotlib is not installed (pip install matplotlib).")
        return None
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for points, label in ((train, "train"), (val, "validation")):
        if points:
            axes.plot(*zip(*points, strict=True), label=label, marker="o" if len(points) < 20 else None)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_file(path) as staging:
        figure.savefig(staging, format="png")
    plt.close(figure)
    log.info("Loss curve: %s", path)
    return path
