"""One vector per sequence from per-token hidden states: last real token, first real token, mean over real tokens."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightningllm.errors import ConfigError

Pooling = Literal["last", "first", "mean"]
POOLINGS = ("last", "first", "mean")


def pool(hidden: Tensor, padding: Tensor | None, pooling: Pooling) -> Tensor:
    """hidden: (B, T, dim), padding: (B, T) bool or None -> (B, dim).

    Args:
        hidden: per-token hidden states.
        padding: True at real tokens (None: all real); works for left and right padding alike.
        pooling: ``last`` real token (what a causal model has read everything at), ``first`` real token
            (BERT's [CLS] position), or ``mean`` over the real tokens.
    """
    B, T, _ = hidden.shape
    real = torch.ones(B, T, dtype=torch.bool, device=hidden.device) if padding is None else padding.bool()
    if pooling == "mean":
        weights = real.to(hidden.dtype)[..., None]  # (B, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    positions = torch.arange(T, device=hidden.device).expand(B, T)  # (B, T)
    if pooling == "last":
        index = torch.where(real, positions, -1).amax(1).clamp(min=0)  # (B,) last real position
    elif pooling == "first":
        index = torch.where(real, positions, T).amin(1).clamp(max=T - 1)  # (B,) first real position
    else:
        check_pooling(pooling, "pool")
    return hidden[torch.arange(B, device=hidden.device), index]  # (B, dim)


def check_pooling(pooling: str, owner: str, allowed: tuple[str, ...] = POOLINGS) -> None:
    """Refuse an unknown pooling name with the allowed ones."""
    if pooling not in allowed:
        raise ConfigError(
            f"{owner} pooling={pooling!r} is not a pooling: choose one of {', '.join(allowed)} (last: the last "
            "real token; first: the first real token, BERT's [CLS]; mean: the mean over the real tokens)."
        )
