"""Skeleton of a task: a LightningModule that receives an already-built model.

A task is the *system* (the objective, metrics, optimizer set-up); the network comes in as
``model: nn.Module`` and is built by whoever calls the task: the CLI from YAML, or your own code.
Tasks are not registry plugins; YAML names them by their import path.

How to use it:

1. Copy this file into an importable package (your plugin package made from ``templates/plugin``
   works: ``src/lightningllm_mine/tasks.py``) and rename ``MyTask``.
2. Replace :meth:`MyTask.loss` by your objective; add the task's own knobs to ``__init__`` with type
   hints, defaults and an ``Args:`` entry each (the CLI turns them into options and ``--help``).
3. Name it in a config; the model, optimizer and data are injected as for the built-in tasks::

       model:
         class_path: lightningllm_mine.tasks.MyTask
         init_args:
           model:
             class_path: lightningllm.models.Decoder
             init_args: {dim: 64, n_layers: 2, n_heads: 4, attention: {class_path: MultiHeadAttention},
                         ffn: {class_path: MLP}, norm: {class_path: LayerNorm},
                         position: {class_path: LearnedPosition}, block: {class_path: PreNorm}}
           optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 3.0e-4}}
       data:
         class_path: lightningllm.data.TextDataModule
         init_args: {corpus: path/to/text, tokenizer: {class_path: CharTokenizer}}

   then ``lightningllm fit --config run.yaml``. The CLI links ``data.vocab_size`` to the model's
   ``vocab_size`` because the argument is called ``model``, so keep that name.
4. From Python: ``L.Trainer(max_steps=100).fit(MyTask(model, optimizer=partial(torch.optim.AdamW, lr=3e-4)),
   datamodule=dm)``; reload a checkpoint with ``MyTask.load_from_checkpoint(path, model=model)``.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightningllm.hparams import save_hyperparameters
from lightningllm.tasks.optim import param_groups
from torch import Tensor, nn


class MyTask(L.LightningModule):
    """One-line summary of the objective (cite the paper it comes from).

    The skeleton's objective is next-token cross-entropy over batches
    ``{"input_ids": (B, T), "labels": (B, T)}`` (what :class:`lightningllm.data.TextDataModule` yields),
    for any model that maps ids (B, T) to logits (B, T, vocab_size).

    Args:
        model: the network, already built (for example :class:`lightningllm.models.Decoder`).
        optimizer: called with the model's parameter groups (no weight decay on norms, biases, embeddings).
    """

    def __init__(self, model: nn.Module, optimizer: OptimizerCallable = torch.optim.AdamW) -> None:
        super().__init__()
        # Records the config of the injected model and optimizer when built by the CLI, so that
        # MyTask.load_from_checkpoint(path) can rebuild them; from Python they are left out.
        save_hyperparameters(self, injected=("model", "optimizer"))
        self.model = model
        self.optimizer = optimizer

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids: (B, T) -> logits (B, T, vocab_size)."""
        return self.model(input_ids)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The objective: replace this. Mean next-token cross-entropy, -100 labels ignored."""
        logits = self.model(batch["input_ids"])  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.loss(batch), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Add a learning-rate schedule here (see lightningllm.tasks.optim.warmup_then_decay).
        return self.optimizer(param_groups(self.model))
