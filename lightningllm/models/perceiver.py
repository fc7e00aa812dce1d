"""Perceiver-style encoder: a learned latent array reads a long input by cross-attention, then thinks among latents."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightningllm.config import resolve, spec_of
from lightningllm.contracts import (
    Attention,
    AttentionFactory,
    BlockFactory,
    FeedForward,
    FeedForwardFactory,
    HeadFactory,
    Norm,
    NormFactory,
    Position,
    PositionFactory,
    Transform,
)
from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask
from lightningllm.models.base import LayerOverride, TransformerStack, _check_knobs_are_not_structural
from lightningllm.registry import available, get

__all__ = ["LatentCrossAttention", "PerceiverEncoder"]


class LatentCrossAttention(nn.Module):
    """Latents read the input: a pre-norm cross-attention branch, then a pre-norm feed-forward branch.

    Jaegle et al. (2021), "Perceiver: General Perception with Iterative Attention", section 2.1
    (the cross-attend module; a single layer norm on each of the latents and the input, as in the
    paper's code)::

        z = z + dropout(attention(norm_1(z), context=norm_context(x)))   # latents are the queries
        z = z + dropout(ffn(norm_2(z)))

    Args:
        attention: built attention plugin; called with ``context`` (it must support cross-attention).
        ffn: built feed-forward plugin.
        norm_1: norm of the latents before they form the queries.
        norm_context: norm of the input before it forms the keys and values.
        norm_2: norm of the latents before the feed-forward.
        dropout: residual dropout on each branch's output.
    """

    def __init__(
        self,
        attention: Attention,
        ffn: FeedForward,
        norm_1: Norm,
        norm_context: Norm,
        norm_2: Norm,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.attention, self.ffn = attention, ffn
        self.norm_1, self.norm_context, self.norm_2 = norm_1, norm_context, norm_2
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, latents: Tensor, inputs: Tensor, *, position: Position, positions: Tensor, mask: AttentionMask
    ) -> Tensor:
        """latents: (B, N, dim), inputs: (B, S, dim) -> latents (B, N, dim).

        Args:
            position: the model's positional plugin (cross-attention applies neither rotate nor bias).
            positions: (1, N) indices of the latents (the attention's query positions).
            mask: ``padding`` (B, S) marks the real input tokens; nothing else applies.
        """
        context = self.norm_context(inputs)  # (B, S, dim)
        attended = self.attention(self.norm_1(latents), position=position, positions=positions, mask=mask,
                                  context=context)  # fmt: skip
        latents = latents + self.dropout(attended)  # (B, N, dim)
        return latents + self.dropout(self.ffn(self.norm_2(latents)))


class PerceiverEncoder(TransformerStack):
    """A learned latent array that cross-attends to the input, then self-attends among latents.

    Jaegle et al. (2021), "Perceiver: General Perception with Iterative Attention"; Jaegle et al.
    (2021), "Perceiver IO: A General Architecture for Structured Inputs & Outputs" (the encoder).
    The input (token embedding plus the position plugin's ``embed``) is read by ``n_cross_layers``
    :class:`LatentCrossAttention` layers whose queries are the ``n_latents`` latents; between them run
    ``n_layers`` latent self-attention blocks (built with the block factory, any layout,
    bidirectional), then the final norm. Cross layer ``k`` runs before latent block
    ``k * n_layers // n_cross_layers``, so repeated cross-attends interleave with the latent stack as
    in the Perceiver (each has its own weights; the Perceiver's weight sharing is not implemented).

    Cost: each cross layer scores an (n_latents, S) matrix per head, O(S * n_latents); each latent
    block an (n_latents, n_latents) one, independent of S. Nothing of size (S, S) is ever built, so
    inputs far longer than a full-attention encoder can take fit (the input still costs O(S * dim)
    for its embedding and key/value projections).

    Outputs: :meth:`encode` gives ``(latents, None)`` (every latent is a real key), the form an
    encoder-decoder's cross-attention reads; :meth:`pooled` is the mean over latents, (B, dim), for
    a classification head. The default head is ``NoHead`` (the forward gives the latents); a pooling
    head (``ClassificationHead`` with ``mean``) reads the latents, every one of them real.

    Positions: only the position plugin's ``embed`` is used, on the input (LearnedPosition,
    Sinusoidal). Latents are an unordered set, and cross-attention applies no rotation or score
    bias, so a plugin that rotates queries/keys (RoPE) or biases scores (ALiBi) would leave the input
    without any positional signal: it is refused with ConfigError. ``NoPosition`` is allowed and
    makes the encoder a function of the multiset of input tokens (order-free). Left padding works
    when ``positions`` numbers the real tokens from 0.

    Padding: ``attention_mask`` marks the real input tokens; padded tokens are never attended to, so
    they change nothing (a row with no real token gives the latents' own path, with a zero
    cross-attention branch).

    Args:
        vocab_size: rows of the token embedding.
        dim: model width (of both the input embedding and the latents).
        n_latents: rows of the learned latent array: the output length, whatever the input length.
        n_layers: latent self-attention blocks.
        n_heads: query heads of every attention layer (cross and latent).
        attention: factory of the attention plugin of the latent blocks, called with dim, n_heads,
            n_kv_heads, dropout; also the cross-attention's unless ``cross_attention`` is given.
        ffn: factory of the feed-forward plugin (latent blocks and cross layers), called with dim,
            hidden_dim, dropout.
        norm: factory of the norm plugin, called with dim.
        position: factory of the positional plugin, called once with dim, n_heads, head_dim,
            max_seq_len; must add embeddings (see Positions above).
        block: factory of the latent blocks' layout, called with the built attention, ffn and norms.
        n_cross_layers: cross-attends; 1 (Perceiver IO) reads the input once, more re-read it
            between latent blocks (the Perceiver's iterative attention).
        cross_attention: factory of the cross-attention plugin (None: ``attention``), for example
            softmax cross-attention with linear-attention latent blocks. It must accept ``context``;
            a self-attention-only plugin in ``attention`` needs this set.
        n_kv_heads: key/value heads (None: n_heads, i.e. MHA; 1: MQA; in between: GQA).
        hidden_dim: feed-forward width (None: 4 * dim).
        max_seq_len: longest input the positional plugin must encode.
        dropout: dropout on the input embeddings, residual branches and inside the FFN.
        attention_dropout: dropout on attention probabilities.
        init_std: std of the normal initialisation (linears, embeddings, the latent array, truncated
            at two std for the latents as in the Perceiver); residual output projections
            (``o_proj``, ``down_proj``) get ``init_std / sqrt(2 * n_layers)``.
        overrides: other attention or feed-forward plugins for some latent blocks.
        head: factory of the head plugin, reading the latents (None: ``NoHead``).
        start_weights: an export folder to start from (None: random init).
        transforms: applied after the start weights, in order (freezing, adapters).
    """

    causal = False  # every latent sees every real input token and every other latent
    default_head = "NoHead"

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        n_latents: int,
        n_layers: int,
        n_heads: int,
        attention: AttentionFactory,
        ffn: FeedForwardFactory,
        norm: NormFactory,
        position: PositionFactory,
        block: BlockFactory,
        n_cross_layers: int = 1,
        cross_attention: AttentionFactory | None = None,
        n_kv_heads: int | None = None,
        hidden_dim: int | None = None,
        max_seq_len: int = 2048,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        init_std: float = 0.02,
        overrides: list[LayerOverride] | None = None,
        head: HeadFactory | None = None,
        start_weights: str | None = None,
        transforms: list[Transform] | None = None,
    ) -> None:
        for name, value in {"n_latents": n_latents, "n_cross_layers": n_cross_layers}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"PerceiverEncoder {name}={value!r} is not allowed: give a positive integer (n_latents is the "
                    "number of learned latent vectors, e.g. 64 to 512; n_cross_layers the number of cross-attends "
                    "to the input, 1 by default)."
                )
        _check_position(resolve(spec_of(position)["class_path"], "position"))
        if cross_attention is not None:
            _check_knobs_are_not_structural(type(self).__name__, attention=cross_attention)
        super().__init__(
            vocab_size, dim, n_layers, n_heads, attention, ffn, norm, position, block, n_kv_heads, hidden_dim,
            max_seq_len, dropout, attention_dropout, False, init_std, overrides,
            extra_config={"n_latents": n_latents, "n_cross_layers": n_cross_layers,
                          "cross_attention": None if cross_attention is None else spec_of(cross_attention)},
        )  # fmt: skip
        del self.config["tie_embeddings"]  # no head, nothing to tie
        self.n_latents, self.n_cross_layers = n_latents, n_cross_layers
        cross_attention = cross_attention or attention
        n_kv_heads, hidden_dim = self.config["n_kv_heads"], self.config["hidden_dim"]
        self.latents = nn.Parameter(torch.empty(n_latents, dim))  # (N, dim)
        self.cross_layers = nn.ModuleList(
            LatentCrossAttention(
                attention=cross_attention(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, dropout=attention_dropout),
                ffn=ffn(dim=dim, hidden_dim=hidden_dim, dropout=dropout),
                norm_1=norm(dim=dim),
                norm_context=norm(dim=dim),
                norm_2=norm(dim=dim),
                dropout=dropout,
            )
            for _ in range(n_cross_layers)
        )
        for layer in self.cross_layers:
            layer.attention.check_compatible(self.position)
        self.cross_before = [k * n_layers // n_cross_layers for k in range(n_cross_layers)]  # latent block index
        self.build_head(head, norm=norm, embedding=None, logit_scale=1.0)
        self.finish_build(start_weights, transforms)

    def reset_own_parameters(self) -> None:
        """The latent array ~ truncated Normal(0, init_std) within two std (the modules reset themselves)."""
        nn.init.trunc_normal_(self.latents, std=self.init_std, a=-2 * self.init_std, b=2 * self.init_std)

    def encode(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        positions: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> tuple[Tensor, None]:
        """input_ids: (B, S) -> (latents (B, n_latents, dim), None): None, since every latent is a real key.

        Args:
            input_ids: token ids; give these or ``inputs_embeds`` (B, S, dim).
            attention_mask: (B, S) bool or 0/1, True (1) at real tokens; padded tokens are never
                attended to. None: every token is real.
            positions: (B or 1, S) absolute positions of the input; None: ``0 .. S-1``.
            inputs_embeds: token embeddings instead of ids.
        """
        x = self.embed_inputs(input_ids, inputs_embeds)  # (B, S, dim)
        B, S = x.shape[:2]
        if positions is None:
            self.position.check_length(S)
            positions = torch.arange(S, device=x.device)[None]  # (1, S)
        x = self.dropout(self.position.embed(x, positions))  # (B, S, dim)
        padding = None if attention_mask is None else attention_mask.to(torch.bool)  # (B, S)
        cross_mask = AttentionMask(causal=False, padding=padding)
        latent_mask = AttentionMask(causal=False)  # latents see each other, none is padding
        latent_positions = torch.arange(self.n_latents, device=x.device)[None]  # (1, N)
        z = self.latents.to(x.dtype).expand(B, -1, -1)  # (B, N, dim)
        cross = iter(zip(self.cross_before, self.cross_layers, strict=True))
        step = next(cross, None)
        for i, blk in enumerate(self.blocks):
            while step is not None and step[0] == i:
                z = step[1](z, x, position=self.position, positions=latent_positions, mask=cross_mask)
                step = next(cross, None)
            z = blk(z, position=self.position, positions=latent_positions, mask=latent_mask)
        return self.norm(z), None

    def hidden_states(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        mask: AttentionMask | None = None,
        positions: Tensor | None = None,
        cache: None = None,
    ) -> Tensor:
        """input_ids: (B, S) -> latents (B, n_latents, dim).

        Args:
            input_ids, attention_mask, positions, inputs_embeds: as in :meth:`encode`.
            mask: ``AttentionMask(causal=False, padding=(B, S))``, the other spelling of ``attention_mask``.
            cache: must stay None (a bidirectional model has no cache).
        """
        if cache is not None:
            self.require_causal_for_cache()
        if mask is not None:
            attention_mask = mask.padding if attention_mask is None else attention_mask
        return self.encode(input_ids, attention_mask, positions=positions, inputs_embeds=inputs_embeds)[0]

    def pooled(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, *, positions: Tensor | None = None
    ) -> Tensor:
        """input_ids: (B, S) -> mean over the latents (B, dim), for a classification head.

        Arguments as in :meth:`encode`.
        """
        return self.hidden_states(input_ids, attention_mask, positions=positions).mean(dim=1)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        mask: AttentionMask | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """input_ids: (B, S) -> the head's output on the latents (NoHead: latents (B, n_latents, dim))."""
        latents = self.hidden_states(input_ids, attention_mask, inputs_embeds=inputs_embeds, mask=mask,
                                     positions=positions)  # fmt: skip
        return self.head(latents)  # every latent is real: no padding


def _adds_embeddings_only(position: type[Position]) -> bool:
    return position.rotate is Position.rotate and position.bias is Position.bias


def _check_position(position: type[Position]) -> None:
    """Refuse a positional plugin class whose rotate or bias this model would silently drop."""
    if _adds_embeddings_only(position):
        return
    allowed = [name for name in available("position") if _adds_embeddings_only(get("position", name))]
    raise ConfigError(
        f"PerceiverEncoder cannot use the position plugin {position.__name__}: it encodes positions by "
        "rotating queries and keys or by biasing attention scores, but the latents are an unordered set and "
        "cross-attention from latents to the input applies neither, so the input would carry no positional "
        f"information at all. Use a plugin that adds position embeddings to the input: {', '.join(allowed)} "
        "(NoPosition deliberately makes the encoder order-free)."
    )
