"""What every training task shares: the injected model, its optimizer and schedule, and the scaling switches."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, Protocol

import lightning as L
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lightningllm import registry
from lightningllm.checks import build_optimizer, check_int, check_number
from lightningllm.contracts import prepare_distributed
from lightningllm.strategies import prepare_blocks
from lightningllm.tasks.optim import Schedule, param_groups, trainable_summary, warmup_then_decay

log = logging.getLogger(__name__)


class LossTerm(Protocol):
    """Something added to every task's training loss (a replay loss, a penalty), attached by a callback.

    ``step(batch)`` runs the task's own training step and returns its loss; a term returns the loss to
    optimise: e.g. ``step(batch) + penalty`` or a mix of ``step(part of the batch)`` and a loss of its own.
    The loss then goes through Lightning as the task's would (accumulation, precision scaling, clipping).
    """

    def __call__(self, task: TrainingTask, step: Callable[[Any], Tensor], batch: Any) -> Tensor: ...


class TrainingTask(L.LightningModule):
    """Base of :class:`~lightningllm.tasks.CausalLM`, :class:`~lightningllm.tasks.MaskedLM` and
    :class:`~lightningllm.tasks.SpanCorruption`.

    A task keeps its own explicit ``__init__`` signature (what LightningCLI and ``--help`` read) and
    hands the shared arguments to :meth:`init_training`. The base then provides:

    - ``configure_model``: when fitting starts, the count and share of trainable parameters is logged
      (:func:`~lightningllm.tasks.optim.trainable_summary`, before anything is sharded); plugins that
      shard over ranks split first (expert parallelism, through
      :func:`~lightningllm.contracts.prepare_distributed`), then blocks are compiled and/or
      checkpointed (:func:`~lightningllm.strategies.prepare_blocks`);
    - ``configure_optimizers``: the optimizer over :func:`~lightningllm.tasks.optim.param_groups`
      (no weight decay on norms, biases and embeddings) with linear warmup then decay, stepped per
      optimizer step over the Trainer's estimated total;
    - ``loss_terms``: :class:`LossTerm` s (appended by callbacks such as :class:`~lightningllm.forgetting.EWC`)
      that every task's ``training_step`` goes through, so a regulariser reaches each task's loss unchanged.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "training_step" in vars(cls):
            cls.training_step = _through_loss_terms(vars(cls)["training_step"])

    def init_training(
        self,
        model: nn.Module,
        optimizer: OptimizerCallable,
        warmup_steps: int,
        schedule: Schedule,
        min_lr_ratio: float,
        activation_checkpointing: bool,
        compile: bool,
    ) -> None:
        """Keep the model and the training settings (arguments as in the tasks' docstrings)."""
        owner = type(self).__name__
        check_int(owner, "warmup_steps", warmup_steps, minimum=0)
        check_number(owner, "min_lr_ratio", min_lr_ratio, 0.0, 1.0, extra="(the final learning rate over the peak)")
        self.model = model
        self.optimizer = optimizer
        self.warmup_steps, self.schedule, self.min_lr_ratio = warmup_steps, schedule, min_lr_ratio
        self.activation_checkpointing, self.compile_blocks = activation_checkpointing, compile
        self.loss_terms: list[LossTerm] = []

    @staticmethod
    def ensure_token_head(model: nn.Module, task: str, head: str = "LMHead") -> None:
        """Give ``model`` a fresh ``head`` plugin (registered name) unless its head already gives token logits.

        A backbone exported with a classifier or a score head, started from by a language-modelling task,
        gets the head this task needs; the model's log line says so.
        """
        if model.head.outputs != "tokens":
            model.replace_head(registry.get("head", head), reason=f"{task} needs logits over the vocabulary")

    def configure_model(self) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit" and self.trainer.is_global_zero:
            log.info("%s: %s", type(self).__name__, trainable_summary(self.model))  # before sharding: global counts
        prepare_distributed(self)  # before DDP wraps the module and the optimizer sees the parameters
        prepare_blocks(self.model, activation_checkpointing=self.activation_checkpointing, compile=self.compile_blocks)

    def configure_optimizers(self):
        optimizer = build_optimizer(type(self).__name__, self.optimizer, param_groups(self.model))
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        scheduler = warmup_then_decay(optimizer, self.warmup_steps, total, self.schedule, self.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _through_loss_terms(training_step: Callable) -> Callable:
    """``training_step`` whose loss goes through the task's loss terms (the first term outermost)."""

    @functools.wraps(training_step)
    def step_with_terms(task: TrainingTask, batch: Any, batch_idx: int, *args: Any) -> Tensor:
        terms = getattr(task, "loss_terms", [])
        if not terms or getattr(task, "_in_loss_terms", False):  # a subclass's step calling super(): terms once
            return training_step(task, batch, batch_idx, *args)
        task._in_loss_terms = True
        try:
            step = functools.partial(_own_step, training_step, task, batch_idx, args)
            for term in reversed(terms):
                step = functools.partial(term, task, step)
            return step(batch)
        finally:
            task._in_loss_terms = False

    return step_with_terms


def _own_step(training_step: Callable, task: TrainingTask, batch_idx: int, args: tuple, batch: Any) -> Tensor:
    return training_step(task, batch, batch_idx, *args)
