"""Attention with Linear Biases (ALiBi)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightningllm.contracts import Position
from lightningllm.registry import register


def alibi_slopes(n_heads: int) -> list[float]:
    """Per-head slopes of Press et al. (2022): a geometric sequence starting at ``2 ** (-8 / n)``.

    For a head count that is not a power of two, the slopes of the closest smaller power
    of two come first, followed by every other slope of twice that power.
    """
    closest = 2 ** math.floor(math.log2(n_heads))
    start = 2 ** (-8 / closest)
    slopes = [start ** (i + 1) for i in range(closest)]
    if closest < n_heads:
        slopes += alibi_slopes(2 * closest)[0::2][: n_heads - closest]
    return slopes


@register("position")
class ALiBi(Position):
    """No embeddings; each head adds ``-slope * |query position - key position|`` to its scores.

    "Train Short, Test Long: Attention with Linear Biases Enables Input Length
    Extrapolation" (Press et al., 2022). Under a causal mask this is the paper's
    ``-slope * (i - j)``; the absolute distance also serves bidirectional attention.

    Args:
        dim: model width (unused).
        n_heads: query heads: one slope each.
        head_dim: per-head width (unused).
        max_seq_len: longest training sequence (unused: ALiBi extrapolates).
    """

    slopes: Tensor

    def __init__(self, dim: int, n_heads: int, head_dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.register_buffer("slopes", torch.empty(n_heads), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Refill the slopes (they are not saved, so meta-device init must recompute them)."""
        self.slopes.copy_(torch.tensor(alibi_slopes(self.n_heads), dtype=torch.float32))

    def bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        """q_positions: (B or 1, T), k_positions: (B or 1, S) -> float32 bias (B or 1, H, T, S)."""
        distance = (q_positions[:, :, None] - k_positions[:, None, :]).abs()  # (B, T, S)
        return -self.slopes.float()[None, :, None, None] * distance[:, None].float()  # (B, H, T, S)
