"""Fixed sinusoidal position encodings (Vaswani et al., 2017)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightningllm.contracts import Position
from lightningllm.registry import register


@register("position")
class Sinusoidal(Position):
    """Fixed sin/cos encodings added to the token embeddings.

    "Attention Is All You Need" (Vaswani et al., 2017), section 3.5::

        PE(pos, 2i)     = sin(pos / base ** (2i / dim))
        PE(pos, 2i + 1) = cos(pos / base ** (2i / dim))

    Computed for whatever positions are given, so any length can be encoded.

    Args:
        dim: model width.
        n_heads: query heads (unused).
        head_dim: per-head width (unused).
        max_seq_len: longest sequence (unused: any length works).
        base: the wavelength base (10000 in the paper).
    """

    def __init__(self, dim: int, n_heads: int, head_dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.base = base

    def encoding(self, positions: Tensor) -> Tensor:
        """positions: (B or 1, T) -> float32 encodings (B or 1, T, dim), for any position."""
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float32, device=positions.device) / self.dim
        inv_freq = 1.0 / self.base**exponents  # (ceil(dim/2),)
        angles = positions.float()[..., None] * inv_freq  # (B, T, ceil(dim/2))
        pe = torch.stack((angles.sin(), angles.cos()), dim=-1)  # (B, T, ceil(dim/2), 2)
        return pe.flatten(-2)[..., : self.dim]  # interleave: sin at even, cos at odd indices

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: (B, T, dim), positions: (B or 1, T) -> (B, T, dim)."""
        return x + self.encoding(positions).to(x.dtype)
