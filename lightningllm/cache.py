"""Per-layer key/value cache for incremental decoding."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer.

    Filled left to right, it returns the slots written so far. :meth:`make_static` switches it to
    the fixed shapes ``torch.compile`` and CUDA graphs need: each update writes at the slots the
    decoding loop put in :attr:`slots` and returns all ``max_len`` slots (the loop's mask hides the
    unwritten ones), so one compiled step serves every token. Plugins that cache something else
    (a latent, a running state) subclass it or bring their own object; the decoding loop only calls
    :meth:`reset`.

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
        self.slots: Tensor | None = None  # static mode: (T,) long, where the next update writes

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys/values and return everything cached so far.

        Args:
            k, v: (B, n_kv_heads, T, head_dim) for the T new positions.

        Returns:
            keys, values: (B, n_kv_heads, length + T, head_dim); in static mode all max_len slots.
        """
        if self.slots is not None:
            self.k.index_copy_(2, self.slots, k)
            self.v.index_copy_(2, self.slots, v)
            return self.k, self.v
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot append up to position {end}.")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        """Empty, in the append mode."""
        self.length, self.slots = 0, None

    def make_static(self, slots: Tensor) -> None:
        """Keep the slots written so far and write at ``slots`` (T,) long from now on (updated in place by the loop).

        :attr:`length` becomes ``max_len``: every slot is in play and the mask tells which are visible.
        """
        self.length, self.slots = self.max_len, slots
