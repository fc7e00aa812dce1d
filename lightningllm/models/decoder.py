"""Decoder-only transformer (GPT, Llama, ...), assembled from plugin factories."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightningllm.cache import KVCache
from lightningllm.contracts import (
    AttentionFactory,
    BlockFactory,
    FeedForwardFactory,
    NormFactory,
    PositionFactory,
)
from lightningllm.mask import AttentionMask
from lightningllm.models.base import LayerOverride, TransformerStack

__all__ = ["Decoder", "LayerOverride"]


class Decoder(TransformerStack):
    """Token embedding, ``n_layers`` blocks, final norm and language-model head.

    Args:
        vocab_size: rows of the embedding and the head.
        dim: model width.
        n_layers: number of blocks.
        n_heads: query heads per attention layer.
        attention: factory of the attention plugin, called with dim, n_heads, n_kv_heads, dropout.
        ffn: factory of the feed-forward plugin, called with dim, hidden_dim, dropout.
        norm: factory of the norm plugin, called with dim (each block's two norms and the final norm).
        position: factory of the positional plugin, called once with dim, n_heads, head_dim, max_seq_len.
        block: factory of the block layout, called with the built attention, ffn and norms.
        n_kv_heads: key/value heads (None: n_heads, i.e. MHA; 1: MQA; in between: GQA).
        hidden_dim: feed-forward width (None: 4 * dim).
        max_seq_len: longest sequence the positional plugin must encode.
        dropout: dropout on embeddings, residual branches and inside the FFN.
        attention_dropout: dropout on attention probabilities.
        tie_embeddings: share the embedding matrix with the head.
        scale_logits: multiply logits by 1/sqrt(dim).
        init_std: std of the normal initialisation; residual output projections
            (``o_proj``, ``down_proj``) get ``init_std / sqrt(2 * n_layers)`` (GPT-2).
        overrides: other attention or feed-forward plugins for some layers.
    """

    causal = True  # each position sees only itself and earlier ones

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        n_layers: int,
        n_heads: int,
        attention: AttentionFactory,
        ffn: FeedForwardFactory,
        norm: NormFactory,
        position: PositionFactory,
        block: BlockFactory,
        n_kv_heads: int | None = None,
        hidden_dim: int | None = None,
        max_seq_len: int = 1024,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        tie_embeddings: bool = True,
        scale_logits: bool = False,
        init_std: float = 0.02,
        overrides: list[LayerOverride] | None = None,
    ) -> None:
        super().__init__(
            vocab_size, dim, n_layers, n_heads, attention, ffn, norm, position, block, n_kv_heads, hidden_dim,
            max_seq_len, dropout, attention_dropout, tie_embeddings, init_std, overrides,
            extra_config={"scale_logits": scale_logits},
        )  # fmt: skip
        self.logit_scale = dim**-0.5 if scale_logits else 1.0
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def make_cache(self, batch_size: int, max_len: int | None = None) -> list[KVCache]:
        """One empty cache per block for decoding up to ``max_len`` positions."""
        max_len = max_len or self.max_seq_len
        weight = self.embed.weight
        return [
            blk.attention.make_cache(batch_size, max_len, dtype=weight.dtype, device=weight.device)
            for blk in self.blocks
        ]

    def hidden_states(
        self,
        input_ids: Tensor,
        *,
        mask: AttentionMask | None = None,
        positions: Tensor | None = None,
        cache: list[KVCache] | None = None,
    ) -> Tensor:
        """input_ids: (B, T) -> final-normed hidden states (B, T, dim).

        Args:
            mask: defaults to plain causal attention.
            positions: (B or 1, T) absolute positions; default continues after the cache.
            cache: from :meth:`make_cache`; filled in place.
        """
        T = input_ids.shape[1]
        offset = cache[0].length if cache else 0
        if positions is None:
            self.position.check_length(offset + T)
            positions = torch.arange(offset, offset + T, device=input_ids.device)[None]
        mask = mask if mask is not None else AttentionMask(causal=True)
        x = self.dropout(self.position.embed(self.embed(input_ids), positions))  # (B, T, dim)
        return self.run_blocks(x, positions=positions, mask=mask, cache=cache)

    def forward(
        self,
        input_ids: Tensor,
        *,
        mask: AttentionMask | None = None,
        positions: Tensor | None = None,
        cache: list[KVCache] | None = None,
    ) -> Tensor:
        """input_ids: (B, T) -> logits (B, T, vocab_size); arguments as in :meth:`hidden_states`."""
        h = self.hidden_states(input_ids, mask=mask, positions=positions, cache=cache)
        return self.lm_head(h) * self.logit_scale if self.logit_scale != 1.0 else self.lm_head(h)
