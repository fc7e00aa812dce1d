"""Encoder-decoder transformer (the original Transformer, T5, BART), assembled from plugin factories."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightningllm.cache import KVCache
from lightningllm.config import factory_of, import_class, spec_of
from lightningllm.contracts import (
    IGNORE_INDEX,
    AttentionFactory,
    BlockFactory,
    FeedForwardFactory,
    HeadFactory,
    NormFactory,
    PositionFactory,
    Transform,
)
from lightningllm.errors import ConfigError
from lightningllm.init import initialize
from lightningllm.lifecycle import ModelLifecycle
from lightningllm.mask import AttentionMask
from lightningllm.models.base import (
    LayerOverride,
    TransformerStack,
    _as_override,
    _check_knobs_are_not_structural,
    factories_from_config,
)

__all__ = ["ConditionedDecoder", "EncoderDecoder", "EncoderDecoderCache", "EncoderStack"]


class EncoderStack(TransformerStack):
    """The bidirectional stack of an :class:`EncoderDecoder`: token embedding, blocks, final norm, no head.

    It meets the encoder protocol every encoder of an :class:`EncoderDecoder` meets (a Perceiver
    encoder too): ``encode(input_ids, attention_mask=None) -> (context, context_padding)`` and a
    ``dim`` attribute. Arguments as in :class:`~lightningllm.models.Decoder` (no head, so no tying).
    """

    causal = False  # every source position sees the whole source

    def encode(
        self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
        inputs_embeds: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """input_ids: (B, S) -> (context (B, S, dim), context_padding (B, S) bool or None).

        Args:
            input_ids: source token ids; give these or ``inputs_embeds`` (B, S, dim).
            attention_mask: (B, S) bool or 0/1, True (1) at real tokens; padded source tokens are never
                attended to (here or by the decoder's cross-attention). None: every token is real.
            inputs_embeds: source embeddings instead of ids.
        """
        x = self.embed_inputs(input_ids, inputs_embeds)  # (B, S, dim)
        S = x.shape[1]
        self.position.check_length(S)
        positions = torch.arange(S, device=x.device)[None]  # (1, S)
        x = self.dropout(self.position.embed(x, positions))  # (B, S, dim)
        padding = None if attention_mask is None else attention_mask.to(torch.bool)  # (B, S)
        h = self.run_blocks(x, positions=positions, mask=AttentionMask(causal=False, padding=padding))
        return h, padding


class EncoderDecoderCache(list):
    """What :meth:`EncoderDecoder.make_cache` returns: the decoder's self-attention caches, one per block.

    It is a plain list of them, so :func:`lightningllm.generation.generate` reads ``cache[0].length``
    and resets them when it slides its window, and it carries ``cross_attention``: one cache per
    block holding the keys/values of the encoder output, filled on the first decoding step and
    reused by every later one (a window slide leaves them alone: the source has not changed).

    Args:
        self_attention: one cache per decoder block.
        cross_attention: one cache per decoder block, for the context.
    """

    def __init__(self, self_attention: list[KVCache], cross_attention: list[KVCache]) -> None:
        super().__init__(self_attention)
        self.cross_attention = list(cross_attention)


class EncoderDecoder(ModelLifecycle, nn.Module):
    """Encoder stack, decoder stack with cross-attention, and a language-model head.

    Vaswani et al. (2017), "Attention Is All You Need"; T5 (Raffel et al., 2020, section 3.1). The
    encoder reads the source bidirectionally (padding masked out); each decoder block runs causal
    self-attention over the target so far, then cross-attention to the encoder output, then the
    feed-forward (see the block layouts for the exact wiring). Both stacks are built from the same
    plugin factories as :class:`~lightningllm.models.Decoder`; each has its own positional plugin
    and final norm, and they share the token embedding, as T5 does (with ``tie_embeddings`` the head
    shares it too).

    ``causal = True`` speaks of what the model *outputs*: the logits at target position ``t`` depend
    on decoder inputs ``<= t`` only (and on the whole source), so teacher forcing trains every
    position at once and decoding can cache. The encoder, by itself, is bidirectional.

    Another encoder: pass a built module as ``encoder`` (for example the Perceiver of
    :mod:`lightningllm.models.perceiver`) instead of the built-in :class:`EncoderStack`. It must
    have ``encode(input_ids, attention_mask=None) -> (context (B, S', dim), padding (B, S') bool or
    None)`` and ``dim`` equal to this model's; the decoder then keeps its own token embedding, and
    ``n_encoder_layers`` and ``encoder_overrides`` must stay unset. For :mod:`lightningllm.io`
    export/load it records itself in :attr:`config` as ``{class_path, init_args}``, which needs a
    ``config`` dict and a ``from_config`` classmethod on the encoder (as every lightningllm model
    has); a Lightning checkpoint needs neither.

    Sampling: :meth:`decoder_for` encodes a source once and returns the decoder half bound to it,
    which :func:`lightningllm.generation.generate` drives like any decoder-only model.

    Args:
        vocab_size: rows of the shared embedding and the head (T5 sentinels included, see
            :class:`~lightningllm.tasks.span_corruption.SpanCorruption`).
        dim: model width.
        n_layers: decoder blocks.
        n_heads: query heads per attention layer.
        attention: factory of the self-attention plugin (both stacks), called with dim, n_heads,
            n_kv_heads, dropout.
        ffn: factory of the feed-forward plugin, called with dim, hidden_dim, dropout.
        norm: factory of the norm plugin, called with dim.
        position: factory of the positional plugin, called once per stack with dim, n_heads, head_dim,
            max_seq_len (so each stack has its own parameters, e.g. its own relative-bias table).
        block: factory of the block layout; decoder blocks also get ``cross_attention`` and
            ``norm_cross``.
        n_encoder_layers: encoder blocks (None: n_layers). Only with the built-in encoder.
        cross_attention: factory of the decoder's cross-attention plugin (None: ``attention``).
        decoder_position: factory of the decoder stack's positional plugin (None: ``position``), e.g. T5's
            causal :class:`~lightningllm_plugins.position.relative_bias.RelativePositionBias` beside the
            encoder's bidirectional one.
        encoder: a built encoder module to use instead of the built-in stack (see above).
        n_kv_heads: key/value heads (None: n_heads, i.e. MHA; 1: MQA; in between: GQA).
        hidden_dim: feed-forward width (None: 4 * dim).
        max_seq_len: longest source and longest target the positional plugins must encode.
        dropout: dropout on embeddings, residual branches and inside the FFN.
        attention_dropout: dropout on attention probabilities.
        tie_embeddings: share the embedding matrix with the head.
        scale_logits: multiply logits by 1/sqrt(dim) (T5 does with tied embeddings).
        init_std: std of the normal initialisation; residual output projections get
            ``init_std / sqrt(2 * n_layers)`` of their stack.
        overrides: other attention or feed-forward plugins for some decoder layers.
        encoder_overrides: the same for some encoder layers (built-in encoder only).
        decoder_start_id: first decoder input, before the shifted target (T5 uses <pad>; the
            default is lightningllm's <bos>).
        pad_id: what :meth:`shift_right` writes where labels are -100.
        head: factory of the head plugin on the decoder output, called with dim, vocab_size, norm,
            embedding (when tied) and logit_scale (None: ``LMHead``).
        start_weights: an export folder or a Hugging Face folder to start from (None: random init).
        transforms: applied after the start weights, in order (freezing, adapters).
    """

    causal = True  # of the output: target position t sees decoder inputs <= t (and the whole source)

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
        n_encoder_layers: int | None = None,
        cross_attention: AttentionFactory | None = None,
        decoder_position: PositionFactory | None = None,
        encoder: nn.Module | None = None,
        n_kv_heads: int | None = None,
        hidden_dim: int | None = None,
        max_seq_len: int = 512,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        tie_embeddings: bool = True,
        scale_logits: bool = False,
        init_std: float = 0.02,
        overrides: list[LayerOverride] | None = None,
        encoder_overrides: list[LayerOverride] | None = None,
        decoder_start_id: int = 2,
        pad_id: int = 0,
        head: HeadFactory | None = None,
        start_weights: str | None = None,
        transforms: list[Transform] | None = None,
    ) -> None:
        super().__init__()
        _check_ids(vocab_size, decoder_start_id, pad_id)
        slots = {"attention": attention, "ffn": ffn, "norm": norm, "position": position, "block": block}
        _check_knobs_are_not_structural(type(self).__name__, **slots)
        if cross_attention is not None:
            _check_knobs_are_not_structural(type(self).__name__, attention=cross_attention)
        if decoder_position is not None:
            _check_knobs_are_not_structural(type(self).__name__, position=decoder_position)
        shared = dict(
            vocab_size=vocab_size, dim=dim, n_heads=n_heads, **slots, n_kv_heads=n_kv_heads, hidden_dim=hidden_dim,
            max_seq_len=max_seq_len, dropout=dropout, attention_dropout=attention_dropout,
            tie_embeddings=tie_embeddings, init_std=init_std,
        )  # fmt: skip
        if encoder is None:
            self.encoder: nn.Module = EncoderStack(n_layers=n_encoder_layers or n_layers, overrides=encoder_overrides,
                                                   **shared)  # fmt: skip
        else:
            _check_encoder(encoder, dim, n_encoder_layers, encoder_overrides)
            self.encoder = encoder
        self.decoder = TransformerStack(
            n_layers=n_layers, overrides=overrides, cross_attention=cross_attention or attention,
            **{**shared, "position": decoder_position or position},
        )  # fmt: skip
        if encoder is None:
            self.decoder.embed = self.encoder.embed  # one token embedding for both stacks (T5)

        self.vocab_size, self.dim, self.n_layers, self.max_seq_len = vocab_size, dim, n_layers, max_seq_len
        self.n_encoder_layers = None if encoder is not None else n_encoder_layers or n_layers
        self.decoder_start_id, self.pad_id, self.init_std = decoder_start_id, pad_id, init_std
        stack = self.decoder.config
        self.config = {
            "vocab_size": vocab_size, "dim": dim, "n_layers": n_layers, "n_heads": n_heads,
            **{slot: stack[slot] for slot in slots}, "position": spec_of(position),
            "n_encoder_layers": self.n_encoder_layers,
            "cross_attention": None if cross_attention is None else spec_of(cross_attention),
            "decoder_position": None if decoder_position is None else spec_of(decoder_position),
            "encoder": None if encoder is None else _encoder_spec(encoder),
            "n_kv_heads": stack["n_kv_heads"], "hidden_dim": stack["hidden_dim"], "max_seq_len": max_seq_len,
            "dropout": dropout, "attention_dropout": attention_dropout, "tie_embeddings": tie_embeddings,
            "scale_logits": scale_logits, "init_std": init_std, "overrides": stack["overrides"],
            "encoder_overrides": [] if encoder is not None else self.encoder.config["overrides"],
            "decoder_start_id": decoder_start_id, "pad_id": pad_id,
        }  # fmt: skip
        self.build_head(head, norm=norm, embedding=self.decoder.embed if tie_embeddings else None,
                        logit_scale=dim**-0.5 if scale_logits else 1.0)  # fmt: skip
        self.finish_build(start_weights, transforms)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EncoderDecoder:
        """Rebuild from :attr:`config` (plugin specs and a custom encoder as ``{class_path, init_args}``)."""
        kwargs = factories_from_config(config)
        kwargs["encoder_overrides"] = [_as_override(o) for o in kwargs.get("encoder_overrides") or []]
        if kwargs.get("decoder_position") is not None:
            kwargs["decoder_position"] = factory_of(kwargs["decoder_position"], "position")
        if kwargs.get("encoder") is not None:
            kwargs["encoder"] = _build_encoder(kwargs["encoder"])
        return cls(**kwargs)

    def record_init(self) -> None:
        """Each built-in stack's rule (its own depth scales its residual outputs), then the head's."""
        if isinstance(self.encoder, TransformerStack):
            self.encoder.record_init()
        self.decoder.record_init()
        super().record_init()

    def reset_parameters(self) -> None:
        """Every module by its own rule, except a given encoder's, which keeps its weights."""
        given = set() if isinstance(self.encoder, EncoderStack) else {id(m) for m in self.encoder.modules()}
        initialize(m for m in self.modules() if id(m) not in given)

    @property
    def output_norm(self) -> nn.Module:
        """The decoder's norm after its last block."""
        return self.decoder.norm

    def hidden_states(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        mask: AttentionMask | None = None,
        positions: Tensor | None = None,
        cache: list[KVCache] | None = None,
        decoder_input_ids: Tensor | None = None,
    ) -> Tensor:
        """The decoder's final hidden states (B, T, dim) for a source and a target prefix.

        Args:
            input_ids: (B, S) source ids; the built-in encoder also takes ``inputs_embeds`` (B, S, dim).
            inputs_embeds: source embeddings (B, S, dim) instead of ids.
            mask: its ``padding`` (B, S) marks the real source tokens.
            positions: (B or 1, T) target positions; default continues after the cache.
            cache: from :meth:`make_cache`; filled in place.
            decoder_input_ids: (B, T) target ids shifted right (None: ``decoder_start_id`` alone, T = 1).
        """
        padding = None if mask is None else mask.padding
        embeds = {} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        context, padding = self.encoder.encode(input_ids, attention_mask=padding, **embeds)
        if decoder_input_ids is None:
            decoder_input_ids = torch.full((context.shape[0], 1), self.decoder_start_id, device=context.device)
        return self.decode_hidden(decoder_input_ids, context=context, context_padding=padding, positions=positions,
                                  cache=cache)  # fmt: skip

    # --- the two halves ---------------------------------------------------------------------
    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """input_ids: (B, S) -> (context (B, S', dim), context_padding (B, S') bool or None).

        Args:
            input_ids: source token ids.
            attention_mask: (B, S) bool or 0/1, True (1) at real source tokens; None: all are real.
        """
        return self.encoder.encode(input_ids, attention_mask=attention_mask)

    def decode(
        self,
        decoder_input_ids: Tensor,
        *,
        context: Tensor,
        context_padding: Tensor | None = None,
        positions: Tensor | None = None,
        cache: list[KVCache] | None = None,
    ) -> Tensor:
        """decoder_input_ids: (B, T) -> logits (B, T, vocab_size), reading the encoder output.

        Args:
            context: (B, S', dim) from :meth:`encode`.
            context_padding: (B, S') bool, True at real context tokens (None: all).
            positions: (B or 1, T) absolute target positions; default continues after the cache.
            cache: from :meth:`make_cache` (its ``cross_attention`` caches are used too); filled in place.
        """
        h = self.decode_hidden(decoder_input_ids, context=context, context_padding=context_padding,
                               positions=positions, cache=cache)  # fmt: skip
        return self.head(h)  # (B, T, vocab_size)

    def decode_hidden(
        self,
        decoder_input_ids: Tensor,
        *,
        context: Tensor,
        context_padding: Tensor | None = None,
        positions: Tensor | None = None,
        cache: list[KVCache] | None = None,
    ) -> Tensor:
        """decoder_input_ids: (B, T) -> the decoder's final hidden states (B, T, dim), as in :meth:`decode`."""
        T = decoder_input_ids.shape[1]
        offset = cache[0].length if cache else 0
        if positions is None:
            self.decoder.position.check_length(offset + T)
            positions = torch.arange(offset, offset + T, device=decoder_input_ids.device)[None]  # (1, T)
        x = self.decoder.embed(decoder_input_ids)  # (B, T, dim)
        x = self.decoder.dropout(self.decoder.position.embed(x, positions))
        h = self.decoder.run_blocks(
            x, positions=positions, mask=AttentionMask(causal=True), cache=cache, context=context,
            context_mask=AttentionMask(causal=False, padding=context_padding),
            cross_cache=getattr(cache, "cross_attention", None),
        )  # fmt: skip  # (B, T, dim)
        return h

    def forward(
        self, input_ids: Tensor, decoder_input_ids: Tensor | None = None, *, attention_mask: Tensor | None = None
    ) -> Tensor:
        """Teacher forcing. input_ids: (B, S), decoder_input_ids: (B, T) -> logits (B, T, vocab_size).

        Args:
            input_ids: source token ids.
            decoder_input_ids: target ids shifted right (:meth:`shift_right`).
            attention_mask: (B, S) True (1) at real source tokens; None: all are real.
        """
        if decoder_input_ids is None:
            raise ConfigError(
                "EncoderDecoder needs decoder_input_ids (the target shifted right, see shift_right) besides the "
                "source input_ids. To sample, encode the source once with model.decoder_for(input_ids) and pass "
                "that to lightningllm.generation.generate with the decoder start ids as the prompt."
            )
        context, padding = self.encode(input_ids, attention_mask=attention_mask)
        return self.decode(decoder_input_ids, context=context, context_padding=padding)

    # --- targets and decoding ----------------------------------------------------------------
    def shift_right(self, labels: Tensor) -> Tensor:
        """Decoder inputs for teacher forcing. labels: (B, T) -> (B, T).

        ``[decoder_start_id, labels[:, :-1]]``, with -100 (ignored label) written as ``pad_id``.
        """
        start = labels.new_full((labels.shape[0], 1), self.decoder_start_id)  # (B, 1)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)  # (B, T)
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.pad_id)

    def make_cache(
        self, batch_size: int, max_len: int | None = None, *, context_len: int | None = None
    ) -> EncoderDecoderCache:
        """Empty caches for decoding: per decoder block, one for self-attention and one for cross-attention.

        Args:
            batch_size: B.
            max_len: the most target positions (None: max_seq_len).
            context_len: the most encoder-output positions S' (None: max_seq_len).
        """
        max_len, context_len = max_len or self.max_seq_len, context_len or self.max_seq_len
        tensor_kwargs = {"dtype": self.decoder.embed.weight.dtype, "device": self.decoder.embed.weight.device}
        blocks = self.decoder.blocks
        return EncoderDecoderCache(
            [blk.attention.make_cache(batch_size, max_len, **tensor_kwargs) for blk in blocks],
            [blk.cross_attention.make_cache(batch_size, context_len, **tensor_kwargs) for blk in blocks],
        )

    def decoder_for(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> ConditionedDecoder:
        """Encode ``input_ids`` (B, S) once and return the decoder bound to that source.

        The encoding runs in eval mode without gradients (this is for decoding). The result is what
        :func:`lightningllm.generation.generate` drives::

            decoder = model.decoder_for(source)  # the encoder runs here, once
            start = torch.full((B, 1), model.decoder_start_id)
            out = generate(decoder, start, max_new_tokens=50, eos_id=tokenizer.eos_id)  # (B, 1 + n)
        """
        was_training = self.training
        self.eval()
        with torch.no_grad():
            context, padding = self.encode(input_ids, attention_mask=attention_mask)
        self.train(was_training)
        return ConditionedDecoder(self, context, padding)


class ConditionedDecoder(nn.Module):
    """The decoder half of an :class:`EncoderDecoder` bound to one encoded source (:meth:`EncoderDecoder.decoder_for`).

    It has what :func:`lightningllm.generation.generate` needs from a decoder-only model:
    ``make_cache(batch_size, max_len)``, ``forward(ids, cache=...)`` and ``max_seq_len``. Its
    caches hold the context's cross-attention keys/values after the first step, so neither the
    encoder nor the context projections run again while sampling.

    Args:
        model: the encoder-decoder (a child: ``eval()``/``train()`` reach it).
        context: (B or 1, S', dim) encoder output.
        context_padding: (B or 1, S') bool, True at real context tokens, or None.
    """

    def __init__(self, model: EncoderDecoder, context: Tensor, context_padding: Tensor | None) -> None:
        super().__init__()
        self.model = model
        self.context, self.context_padding = context, context_padding
        self.max_seq_len = model.max_seq_len
        self.train(model.training)  # a new module starts in training mode; generate() restores this flag on exit

    def make_cache(self, batch_size: int, max_len: int | None = None) -> EncoderDecoderCache:
        """Self-attention caches of ``max_len`` positions and cross-attention caches sized to the context."""
        self._check_batch(batch_size)
        return self.model.make_cache(batch_size, max_len, context_len=self.context.shape[1])

    def forward(self, decoder_input_ids: Tensor, *, cache: list[KVCache] | None = None) -> Tensor:
        """decoder_input_ids: (B, T) -> logits (B, T, vocab_size); positions continue after the cache."""
        B = decoder_input_ids.shape[0]
        self._check_batch(B)
        context = self.context.expand(B, -1, -1)  # (B, S', dim)
        padding = None if self.context_padding is None else self.context_padding.expand(B, -1)  # (B, S')
        return self.model.decode(decoder_input_ids, context=context, context_padding=padding, cache=cache)

    def _check_batch(self, batch_size: int) -> None:
        if self.context.shape[0] not in (1, batch_size):
            raise ConfigError(
                f"The decoder was bound to {self.context.shape[0]} encoded source(s) but asked to decode a batch of "
                f"{batch_size}: give one source per row (or a single source, shared by every row)."
            )


def _check_ids(vocab_size: int, decoder_start_id: int, pad_id: int) -> None:
    for name, value in {"decoder_start_id": decoder_start_id, "pad_id": pad_id}.items():
        if not 0 <= value < vocab_size:
            raise ConfigError(
                f"EncoderDecoder {name}={value} is not an id of its vocabulary of vocab_size={vocab_size}: give an "
                "id in 0..vocab_size-1 (lightningllm tokenizers: <pad> 0, <bos> 2)."
            )


def _check_encoder(encoder: nn.Module, dim: int, n_encoder_layers: int | None, overrides: list | None) -> None:
    if not callable(getattr(encoder, "encode", None)):
        raise ConfigError(
            f"EncoderDecoder got encoder={type(encoder).__name__}, which has no encode method. An encoder module "
            "provides encode(input_ids, attention_mask=None) -> (context (B, S', dim), padding (B, S') or None)."
        )
    if getattr(encoder, "dim", dim) != dim:
        raise ConfigError(
            f"EncoderDecoder dim={dim} but its encoder {type(encoder).__name__} has dim={encoder.dim}: the decoder's "
            "cross-attention reads the encoder output at the model width. Build both with the same dim."
        )
    if n_encoder_layers is not None or overrides:
        raise ConfigError(
            f"EncoderDecoder got a built encoder ({type(encoder).__name__}) and also n_encoder_layers="
            f"{n_encoder_layers} / encoder_overrides, which only shape the built-in encoder stack. Leave them unset "
            "(configure the encoder module itself)."
        )


def _encoder_spec(encoder: nn.Module) -> dict[str, Any]:
    """``{class_path, init_args}`` of a given encoder; init_args None when it cannot describe itself."""
    cls = type(encoder)
    config = getattr(encoder, "config", None)
    rebuildable = isinstance(config, dict) and callable(getattr(cls, "from_config", None))
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(config) if rebuildable else None}


def _build_encoder(spec: dict[str, Any]) -> nn.Module:
    class_path, init_args = spec["class_path"], spec.get("init_args")
    if init_args is None:
        raise ConfigError(
            f"This EncoderDecoder config names the encoder {class_path!r} but holds no init_args for it: that "
            "encoder has no config dict and from_config classmethod, so it cannot be rebuilt. Give the encoder "
            "class both (as lightningllm models have), or rebuild the model in Python with encoder=."
        )
    try:
        cls = import_class(class_path, "encoder")
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(
            f"The EncoderDecoder config names encoder class {class_path!r}, which cannot be imported."
        ) from None
    return cls.from_config(init_args)
