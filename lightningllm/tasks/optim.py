"""Optimizer parameter groups, learning-rate schedules and the trainable-parameter count shared by the tasks."""

from __future__ import annotations

import math
from typing import Literal

from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.optimizer import Optimizer

Schedule = Literal["cosine", "linear", "constant"]


def param_groups(model: nn.Module) -> list[dict]:
    """Split trainable parameters into decayed and not decayed (norms, biases, embeddings).

    The no-decay group sets ``weight_decay=0``; the other keeps the optimizer's own value.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or id(param) in embeddings else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def trainable_summary(model: nn.Module) -> str:
    """One line: how many of ``model``'s parameters train, e.g. ``trainable 12,288 of 1,234,567 parameters
    (1.00%)``. A tensor held by several modules (a tied head) counts once."""
    params = list(model.parameters())  # unique tensors
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"


def warmup_then_decay(
    optimizer: Optimizer, warmup_steps: int, total_steps: int, schedule: Schedule, min_lr_ratio: float
) -> LambdaLR:
    """Linear warmup from 0 over ``warmup_steps``, then cosine or linear decay to ``min_lr_ratio * lr``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return LambdaLR(optimizer, factor)
