"""A small description of which keys each query may see.

Attention plugins turn it into the cheapest kernel call: SDPA's ``is_causal`` fast
path when nothing but causality applies, a boolean mask otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may attend to.

    Args:
        causal: queries see keys at the same or earlier positions only.
        padding: (B, S) bool, True where the key is a real token (S = keys incl. cache).
        prefix_lengths: (B,) int, the first ``prefix_lengths[b]`` tokens attend bidirectionally
            among themselves (prefix-LM); only meaningful with ``causal``.
        window: sliding window: a query sees at most the ``window`` most recent keys.
        document_ids: (B, S) int, packed documents: queries see keys of their own document only.
        key_positions: (B or 1, S) int, the absolute positions of the keys (cached ones included) when they
            are not the consecutive positions just before the queries: a static cache returns all its slots,
            the unwritten ones after the queries (hidden by ``causal``), left padding before them (``padding``).
    """

    causal: bool = True
    padding: Tensor | None = None
    prefix_lengths: Tensor | None = None
    window: int | None = None
    document_ids: Tensor | None = None
    key_positions: Tensor | None = None

    def is_plain_causal(self) -> bool:
        """True when SDPA's ``is_causal`` fast path expresses this mask exactly (no cache offset)."""
        return (
            self.causal
            and self.padding is None
            and self.prefix_lengths is None
            and self.window is None
            and self.document_ids is None
            and self.key_positions is None
        )

    def is_empty(self) -> bool:
        """True when every query sees every key."""
        return not self.causal and self.padding is None and self.window is None and self.document_ids is None

    def keys_at(self, positions: Tensor, S: int) -> Tensor:
        """The absolute positions of the S keys that queries at ``positions`` (B or 1, T) attend to -> (B or 1, S).

        ``key_positions`` when given; else the queries' own positions when S == T; else S - T cached keys at the
        consecutive positions just before the queries.
        """
        if self.key_positions is not None:
            return self.key_positions
        T = positions.shape[1]
        if S == T:
            return positions
        return torch.arange(S, device=positions.device) + (positions[:, :1] - (S - T))

    def allowed(self, q_positions: Tensor, k_positions: Tensor) -> Tensor | None:
        """Boolean mask, True where attention is allowed.

        Args:
            q_positions: (B or 1, T) absolute positions of the queries.
            k_positions: (B or 1, S) absolute positions of the keys.

        Returns:
            bool, broadcastable to (B, 1, T, S) (a size-1 T when only padding applies), or None when
            every key is visible.
        """
        if self.is_empty():
            return None
        q = q_positions[:, :, None]  # (B, T, 1)
        k = k_positions[:, None, :]  # (B, 1, S)
        allowed = torch.ones(1, 1, 1, dtype=torch.bool, device=q.device)
        if self.causal:
            causal = k <= q
            if self.prefix_lengths is not None:
                prefix = self.prefix_lengths.to(q.device)[:, None, None]
                causal = causal | ((q < prefix) & (k < prefix))
            allowed = allowed & causal
        if self.window is not None:
            allowed = allowed & (q - k < self.window)
        if self.document_ids is not None:
            docs = self.document_ids.to(q.device)
            doc_q = docs[:, -q_positions.shape[1] :, None]
            allowed = allowed & (doc_q == docs[:, None, :])
        if self.padding is not None:
            allowed = allowed & self.padding.to(device=q.device, dtype=torch.bool)[:, None, :]
        return allowed[:, None]  # (B, 1, T, S)
