"""Encoder-only transformer (BERT, RoBERTa, ...), assembled from plugin factories."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightningllm.contracts import (
    AttentionFactory,
    BlockFactory,
    FeedForwardFactory,
    HeadFactory,
    NormFactory,
    PositionFactory,
    Transform,
)
from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask
from lightningllm.models.base import LayerOverride, TransformerStack, query_padding

__all__ = ["Encoder"]


class Encoder(TransformerStack):
    """Bidirectional transformer, by default with a masked-language-model head (Devlin et al., 2019, "BERT").

    Every token attends to every real token of its sequence, earlier and later; ``attention_mask``
    marks the real (not padded) tokens. Inputs are the sum of token, positional (the position
    plugin's ``embed``) and, with ``n_segments > 0``, segment (token-type) embeddings. Post-norm
    layouts (``block.final_norm`` False, BERT's) normalise the embeddings before the first block
    (BERT's embedding LayerNorm) and add no norm after the last; pre-norm layouts add the final norm
    after the last block, as in :class:`~lightningllm.models.Decoder`.

    The default head is BERT's (:class:`~lightningllm_plugins.head.masked_lm_head.MaskedLMHead`:
    dense -> GELU -> norm, then a projection to the vocabulary with a bias, whose weight is the token
    embedding when ``tie_embeddings``); ``NoHead`` gives the bare encoder (Hugging Face's ``BertModel``),
    ``ClassificationHead`` a classifier.

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
        head: factory of the head plugin, called with dim, vocab_size, norm, embedding (when tied) and
            logit_scale (None: ``MaskedLMHead``).
        start_weights: an export folder or a Hugging Face folder to start from (None: random init).
        transforms: applied after the start weights, in order (freezing, adapters).
    """

    causal = False
    default_head = "MaskedLMHead"  # every position sees the whole sequence
    renamed_weights = {"transform.": "head.transform.", "transform_norm.": "head.norm.", "lm_head.": "head.proj."}

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
        head: HeadFactory | None = None,
        start_weights: str | None = None,
        transforms: list[Transform] | None = None,
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
        self.build_head(head, norm=norm, embedding=self.embed if tie_embeddings else None, logit_scale=1.0)
        self.finish_build(start_weights, transforms)

    def hidden_states(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        mask: AttentionMask | None = None,
        positions: Tensor | None = None,
        cache: None = None,
        attention_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
    ) -> Tensor:
        """input_ids: (B, T) -> contextual hidden states (B, T, dim); ``[:, 0]`` is the [CLS] representation.

        Args:
            input_ids: token ids; give these or ``inputs_embeds``.
            inputs_embeds: token embeddings (B, T, dim) instead of ids.
            mask: ``AttentionMask(causal=False, padding=(B, T) bool)``; its padding marks the real tokens.
            positions: (B or 1, T) absolute positions; None: ``0 .. T-1``.
            cache: must stay None (a bidirectional model has no cache).
            attention_mask: (B, T) bool or 0/1, True (1) at real tokens, the Hugging Face spelling of
                ``mask``'s padding; padded keys are never attended to. None: every token is real.
            segment_ids: (B, T) int in ``[0, n_segments)``; None: segment 0 everywhere. Only with
                ``n_segments > 0``.
        """
        x = self.embed_inputs(input_ids, inputs_embeds)  # (B, T, dim)
        T = x.shape[1]
        if cache is not None:
            self.require_causal_for_cache()
        if positions is None:
            self.position.check_length(T)
            positions = torch.arange(T, device=x.device)[None]  # (1, T)
        if segment_ids is not None and self.segment_embed is None:
            raise ConfigError(
                "segment_ids were given to an Encoder built with n_segments=0, which has no segment embeddings. "
                "Build it with n_segments >= 1 (BERT: 2), or leave segment_ids out."
            )
        if self.segment_embed is not None:
            segment_ids = (
                torch.zeros(x.shape[:2], dtype=torch.long, device=x.device) if segment_ids is None else segment_ids
            )
            x = x + self.segment_embed(segment_ids)  # (B, T, dim)
        x = self.dropout(self.embed_norm(self.position.embed(x, positions)))  # (B, T, dim)
        return self.run_blocks(x, positions=positions, mask=_bidirectional(mask, attention_mask))

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        mask: AttentionMask | None = None,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
    ) -> Tensor:
        """input_ids: (B, T) -> the head's output (MaskedLMHead: logits (B, T, vocab_size)); arguments as in
        :meth:`hidden_states`."""
        mask = _bidirectional(mask, attention_mask)
        h = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, mask=mask, positions=positions,
                               segment_ids=segment_ids)  # fmt: skip
        return self.head(h, padding=query_padding(mask, h.shape[1]))


def _bidirectional(mask: AttentionMask | None, attention_mask: Tensor | None) -> AttentionMask:
    """One bidirectional mask from either spelling of the padding."""
    if mask is not None and attention_mask is not None:
        raise ConfigError("Encoder takes the padding once: give mask=AttentionMask(...) or attention_mask=, not both.")
    if mask is not None:
        return mask
    return AttentionMask(causal=False, padding=None if attention_mask is None else attention_mask.to(torch.bool))
