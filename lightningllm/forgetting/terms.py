"""Attaching a loss term to the task a callback runs with."""

from __future__ import annotations

import lightning as L

from lightningllm.errors import ConfigError
from lightningllm.tasks.base import LossTerm, TrainingTask


def attach(task: L.LightningModule, term: LossTerm) -> None:
    """Append ``term`` to ``task.loss_terms`` (once), refusing tasks whose training loss it cannot reach."""
    owner = type(term).__name__
    if not isinstance(task, TrainingTask):
        raise ConfigError(
            f"{owner} adds to the training loss of a lightningllm task (a TrainingTask such as InstructionTuning or "
            f"SequenceClassification), but the model is a {type(task).__name__}. Remove the {owner} callback."
        )
    if not task.automatic_optimization:
        raise ConfigError(
            f"{owner} adds to the loss a task returns from training_step, but {type(task).__name__} optimises "
            f"manually (its training_step returns no loss). Remove the {owner} callback."
        )
    if term not in task.loss_terms:
        task.loss_terms.append(term)
