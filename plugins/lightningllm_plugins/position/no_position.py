"""No positional encoding (NoPE)."""

from __future__ import annotations

from lightningllm.contracts import Position
from lightningllm.registry import register


@register("position")
class NoPosition(Position):
    """No positional information at all: every hook is a no-op.

    A causal decoder can still infer order from its mask (Haviv et al., 2022,
    "Transformer Language Models without Positional Encodings Still Learn Positional
    Information"; Kazemnejad et al., 2023, "The Impact of Positional Encoding on Length
    Generalization in Transformers").

    Args:
        dim: model width (unused).
        n_heads: query heads (unused).
        head_dim: per-head width (unused).
        max_seq_len: longest sequence (unused: any length works).
    """

    def __init__(self, dim: int, n_heads: int, head_dim: int, max_seq_len: int) -> None:
        super().__init__()
