"""Scalar head: one number per sequence (a reward model) or per token (a value model)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from lightningllm.contracts import Head, NormFactory
from lightningllm.pooling import POOLINGS, check_pooling, pool
from lightningllm.registry import register


@register("head")
class ScalarHead(Head):
    """``proj(dropout(hidden))`` to one number: per sequence after pooling, or per token.

    Reward models score a whole sequence (Ouyang et al., 2022, "Training language models to follow
    instructions with human feedback", section 3.5: the last token); value models give one estimate
    per token (PPO's critic). ``pooling`` ``token`` keeps every position.

    Args:
        dim: model width (passed by the model).
        pooling: ``last``, ``first``, ``mean`` (one number per sequence, (B,)) or ``token`` ((B, T)).
        dropout: dropout on the vectors in training.
        vocab_size, norm, embedding, logit_scale: passed by the model; unused.
    """

    outputs = "score"

    def __init__(
        self, *, dim: int, pooling: Literal["last", "first", "mean", "token"] = "last", dropout: float = 0.0,
        vocab_size: int = 0, norm: NormFactory | None = None, embedding: nn.Embedding | None = None,
        logit_scale: float = 1.0,
    ) -> None:  # fmt: skip
        super().__init__()
        check_pooling(pooling, "ScalarHead", (*POOLINGS, "token"))
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, 1)

    def forward(self, hidden: Tensor, *, padding: Tensor | None = None) -> Tensor:
        """hidden: (B, T, dim), padding: (B, T) bool True at real tokens -> (B,), or (B, T) with ``token``."""
        if self.pooling == "token":
            return self.proj(self.dropout(hidden)).squeeze(-1)  # (B, T)
        return self.proj(self.dropout(pool(hidden, padding, self.pooling))).squeeze(-1)  # (B,)
