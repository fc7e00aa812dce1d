"""Decoder-only transformer (GPT, Llama, ...), assembled from plugin factories."""

from __future__ import annotations

import torch
from torch import Tensor

from lightningllm.cache import KVCache
from lightningllm.contracts import (
    AttentionFactory,
    BlockFactory,
    FeedForwardFactory,
    HeadFactory,
    NormFactory,
    PositionFactory,
    Transform,
)
from lightningllm.mask import AttentionMask
from lightningllm.models.base import (
    LayerOverride,
    TransformerStack,
    add_virtual_tokens,
    query_padding,
    skip_virtual_tokens,
)

__all__ = ["Decoder", "LayerOverride"]


class Decoder(TransformerStack):
    """Token embedding, ``n_layers`` blocks, final norm and a head (the language-model head by default).

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
        head: factory of the head plugin, called with dim, vocab_size, norm, embedding (when tied) and
            logit_scale (None: ``LMHead``).
        start_weights: an export folder or a Hugging Face folder to start from (None: random init).
        transforms: applied after the start weights, in order (freezing, adapters).
    """

    causal = True  # each position sees only itself and earlier ones
    takes_virtual_tokens = True  # prompt and prefix tuning: see add_virtual_tokens

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
        head: HeadFactory | None = None,
        start_weights: str | None = None,
        transforms: list[Transform] | None = None,
    ) -> None:
        super().__init__(
            vocab_size, dim, n_layers, n_heads, attention, ffn, norm, position, block, n_kv_heads, hidden_dim,
            max_seq_len, dropout, attention_dropout, tie_embeddings, init_std, overrides,
            extra_config={"scale_logits": scale_logits},
        )  # fmt: skip
        self.build_head(head, norm=norm, embedding=self.embed if tie_embeddings else None,
                        logit_scale=dim**-0.5 if scale_logits else 1.0)  # fmt: skip
        self.finish_build(start_weights, transforms)

    def hidden_states(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        mask: AttentionMask | None = None,
        positions: Tensor | None = None,
        cache: list[KVCache] | None = None,
    ) -> Tensor:
        """input_ids: (B, T) (or inputs_embeds: (B, T, dim)) -> final-normed hidden states (B, T, dim).

        Args:
            input_ids: token ids; give these or ``inputs_embeds``.
            inputs_embeds: token embeddings (B, T, dim) instead of ids (prompt tuning).
            mask: defaults to plain causal attention.
            positions: (B or 1, T) absolute positions; default continues after the cache.
            cache: from :meth:`make_cache`; filled in place.
        """
        x = self.embed_inputs(input_ids, inputs_embeds)  # (B, T, dim)
        T = x.shape[1]
        offset = cache[0].length if cache else 0
        mask = mask if mask is not None else AttentionMask(causal=True)
        if offset == 0:  # prompt and prefix tuning's virtual tokens come first: x (B, n_soft + T, dim)
            given = positions
            x, mask, positions = add_virtual_tokens(self, x, mask, positions)
            if given is None and positions is not None:  # n_virtual + T positions from 0
                self.position.check_length(int(positions[0, -1]) + 1)
        else:
            mask, positions = skip_virtual_tokens(self, mask, positions, offset)
        if positions is None:
            self.position.check_length(offset + T)
            positions = torch.arange(offset, offset + T, device=x.device)[None]
        x = self.dropout(self.position.embed(x, positions))  # (B, n_soft + T, dim)
        return self.run_blocks(x, positions=positions, mask=mask, cache=cache)[:, -T:]

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        mask: AttentionMask | None = None,
        positions: Tensor | None = None,
        cache: list[KVCache] | None = None,
    ) -> Tensor:
        """input_ids: (B, T) -> the head's output (LMHead: logits (B, T, vocab_size)); arguments as in
        :meth:`hidden_states`."""
        h = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, mask=mask, positions=positions, cache=cache)
        return self.head(h, padding=query_padding(mask, h.shape[1]))
