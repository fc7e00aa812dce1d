"""Recording a task's hyperparameters so ``load_from_checkpoint`` can rebuild it."""

from __future__ import annotations

import inspect

import lightning as L
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters


def save_task_hyperparameters(task: L.LightningModule, injected: tuple[str, ...] = ("model", "optimizer")) -> None:
    """Call from a task's ``__init__`` instead of ``save_hyperparameters()``.

    Under LightningCLI the injected modules arrive as config (``class_path`` + ``init_args``),
    which Lightning records, so ``Task.load_from_checkpoint(path)`` rebuilds them. A Python
    caller passed built objects: those are left out of the checkpoint, and reloading takes
    them again: ``Task.load_from_checkpoint(path, model=model)``.
    """
    caller = inspect.currentframe().f_back  # the task's __init__
    if _given_hyperparameters.get() is not None:
        task.save_hyperparameters(frame=caller)
    else:
        task.save_hyperparameters(ignore=list(injected), frame=caller)
