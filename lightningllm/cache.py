"""Per-layer key/value cache for incremental decoding."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer.

    Static shapes (``max_len`` slots, filled left to right) keep decoding friendly to
    ``torch.compile``. Plugins that cache something else (a latent, a running state)
    subclass it or bring their own object; the decoding loop only calls :meth:`reset`.

    Args:
        batch_size: B.
        n_kv_heads: key/value heads.
        max_len: the most positions the cache holds.
        head_dim: per-head width.
    """

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys/values and return everything cached so far.

        Args:
            k, v: (B, n_kv_heads, T, head_dim) for the T new positions.

        Returns:
            keys, values: (B, n_kv_heads, length + T, head_dim).
        """
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot append up to position {end}.")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        self.length = 0
