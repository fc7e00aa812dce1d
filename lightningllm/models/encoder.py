"""Encoder-only transformer (BERT, RoBERTa, ...), assembled from plugin factories."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightningllm.contracts import (
    AttentionFactory,
    BlockFactory,
    FeedForwardFactory,
    NormFactory,
    PositionFactory,
)
from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask
from lightningllm.models.base import LayerOverride, TransformerStack

__all__ = ["Encoder"]


class Encoder(TransformerStack):
    """Bidirectional transformer with a masked-language-model head (Devlin et al., 2019, "BERT").

    Every token attends to every real token of its sequence, earlier and later; ``attention_mask``
    marks the real (not padded) tokens. Inputs are the sum of token, positional (the position
    plugin's ``embed``) and, with ``n_segments > 0``, segment (token-type) embeddings. Post-norm
    layouts (``block.final_norm`` False, BERT's) normalise the embeddings before the first block
    (BERT's embedding LayerNorm) and add no norm after the last; pre-norm layouts add the final norm
    after the last block, as in :class:`~lightningllm.models.Decoder`.

    The head is BERT's: ``transform`` (dense -> GELU -> norm) then a projection to the vocabulary
    with a bias, whose weight is the token embedding when ``tie_embeddings``.

    [CLS] convention: a sequence that starts with the tokenizer's ``bos_id`` (lightningllm's
    tokenizers have no separate [CLS] token) has its representation at ``hidden_states(...)[:, 0]``,
    for classification heads built on top.

    Args:
        vocab_size: rows of the embedding and the head.
        dim: model width.
        n_layers: number of blocks.
        n_heads: query heads per attention layer.
        attention: factory of the attention plugin, called with dim, n_heads, n_kv_heads, dropout.
        ffn: factory of the feed-forward plugin, called with dim, hidden_dim, dropout.
        norm: factory of the norm plugin, called with dim (each block's norms, the embedding or final
            norm, and the head's norm).
        position: factory of the positional plugin, called once with dim, n_heads, head_dim, max_seq_len.
        block: factory of the block layout, called with the built attention, ffn and norms.
        n_kv_heads: key/value heads (None: n_heads, i.e. MHA; 1: MQA; in between: GQA).
        hidden_dim: feed-forward width (None: 4 * dim).
        max_seq_len: longest sequence the positional plugin must encode.
        dropout: dropout on embeddings, residual branches and inside the FFN.
        attention_dropout: dropout on attention probabilities.
        tie_embeddings: share the embedding matrix with the head's output projection.
        n_segments: rows of the segment (token-type) embedding; BERT uses 2 for sentence pairs,
            0 means none.
        init_std: std of the normal initialisation; residual output projections
            (``o_proj``, ``down_proj``) get ``init_std / sqrt(2 * n_layers)``.
        overrides: other attention or feed-forward plugins for some layers.
    """

    causal = False  # every position sees the whole sequence

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
        max_seq_len: int = 512,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        tie_embeddings: bool = True,
        n_segments: int = 0,
        init_std: float = 0.02,
        overrides: list[LayerOverride] | None = None,
    ) -> None:
        if isinstance(n_segments, bool) or not isinstance(n_segments, int) or n_segments < 0:
            raise ConfigError(
                f"Encoder n_segments={n_segments!r} is not allowed: give the number of segment (token-type) "
                "embeddings, an integer >= 0 (0: none; BERT uses 2 for sentence pairs)."
            )
        super().__init__(
            vocab_size, dim, n_layers, n_heads, attention, ffn, norm, position, block, n_kv_heads, hidden_dim,
            max_seq_len, dropout, attention_dropout, tie_embeddings, init_std, overrides,
            extra_config={"n_segments": n_segments},
        )  # fmt: skip
        self.n_segments = n_segments
        self.segment_embed = nn.Embedding(n_segments, dim) if n_segments else None
        self.embed_norm = nn.Identity() if self.block_class.final_norm else norm(dim=dim)
        self.transform = nn.Linear(dim, dim)
        self.transform_norm = norm(dim=dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=True)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def hidden_states(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """input_ids: (B, T) -> contextual hidden states (B, T, dim); ``[:, 0]`` is the [CLS] representation.

        Args:
            attention_mask: (B, T) bool or 0/1, True (1) at real tokens; padded keys are never attended
                to. None: every token is real.
            segment_ids: (B, T) int in ``[0, n_segments)``; None: segment 0 everywhere. Only with
                ``n_segments > 0``.
            positions: (B or 1, T) absolute positions; None: ``0 .. T-1``.
        """
        T = input_ids.shape[1]
        if positions is None:
            self.position.check_length(T)
            positions = torch.arange(T, device=input_ids.device)[None]  # (1, T)
        x = self.embed(input_ids)  # (B, T, dim)
        if segment_ids is not None and self.segment_embed is None:
            raise ConfigError(
                "segment_ids were given to an Encoder built with n_segments=0, which has no segment embeddings. "
                "Build it with n_segments >= 1 (BERT: 2), or leave segment_ids out."
            )
        if self.segment_embed is not None:
            segment_ids = torch.zeros_like(input_ids) if segment_ids is None else segment_ids
            x = x + self.segment_embed(segment_ids)  # (B, T, dim)
        x = self.dropout(self.embed_norm(self.position.embed(x, positions)))  # (B, T, dim)
        padding = None if attention_mask is None else attention_mask.to(torch.bool)  # (B, T)
        return self.run_blocks(x, positions=positions, mask=AttentionMask(causal=False, padding=padding))

    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """input_ids: (B, T) -> masked-LM logits (B, T, vocab_size); arguments as in :meth:`hidden_states`."""
        h = self.hidden_states(input_ids, attention_mask=attention_mask, segment_ids=segment_ids, positions=positions)
        h = self.transform_norm(F.gelu(self.transform(h)))  # (B, T, dim)
        return self.lm_head(h)  # (B, T, vocab_size)
