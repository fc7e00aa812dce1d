"""Recording hyperparameters so ``load_from_checkpoint`` can rebuild a task or a data module."""

from __future__ import annotations

import inspect

import lightning as L
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters


def save_hyperparameters(module: L.LightningModule | L.LightningDataModule, injected: tuple[str, ...]) -> None:
    """Call from ``__init__`` instead of ``self.save_hyperparameters()``.

    Under LightningCLI the injected modules arrive as config (``class_path`` + ``init_args``),
    which Lightning records, so ``Task.load_from_checkpoint(path)`` rebuilds them. A Python
    caller passed built objects: those are left out of the checkpoint, and reloading takes
    them again: ``Task.load_from_checkpoint(path, model=model)``.
    """
    caller = inspect.currentframe().f_back  # the module's __init__
    if _given_hyperparameters.get() is not None:
        module.save_hyperparameters(frame=caller)
    else:
        module.save_hyperparameters(ignore=list(injected), frame=caller)
