"""What every transformer stack shares: checks, config, embedding, blocks, final norm and initialisation.

:class:`~lightningllm.models.Decoder`, :class:`~lightningllm.models.Encoder` and the two stacks of
:class:`~lightningllm.models.encoder_decoder.EncoderDecoder` add their own
inputs and heads on top of :class:`TransformerStack`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightningllm.cache import KVCache
from lightningllm.checks import check_int, check_number, check_probability
from lightningllm.config import factory_of, spec_of
from lightningllm.contracts import (
    AttentionFactory,
    Block,
    BlockFactory,
    FeedForwardFactory,
    NormFactory,
    PositionFactory,
)
from lightningllm.errors import ConfigError
from lightningllm.init import RESIDUAL_OUTPUTS
from lightningllm.lifecycle import ModelLifecycle, lifecycle_kwargs
from lightningllm.mask import AttentionMask


@dataclass
class LayerOverride:
    """Other plugins for some layers: mixture-of-experts on every other layer, local attention on some.

    Args:
        layers: 0-based indices of the layers it applies to; a later override wins on a shared layer.
        attention: replaces the model's attention factory on those layers.
        ffn: replaces the model's feed-forward factory on those layers.
    """

    layers: list[int]
    attention: AttentionFactory | None = None
    ffn: FeedForwardFactory | None = None


SLOTS = {"attention": "attention", "ffn": "ffn", "norm": "norm", "position": "position", "block": "block"}
__all__ = ["RESIDUAL_OUTPUTS", "LayerOverride", "TransformerStack", "factories_from_config", "query_padding"]


class TransformerStack(ModelLifecycle, nn.Module):
    """Token embedding, positional plugin, ``n_layers`` blocks and the final norm; no head.

    A subclass passes its own knobs in ``extra_config`` (recorded in :attr:`config`, so
    :meth:`from_config` rebuilds it) and builds its inputs after calling this ``__init__``, then
    its head (:meth:`~lightningllm.lifecycle.ModelLifecycle.build_head`) and the rest of the
    lifecycle (:meth:`~lightningllm.lifecycle.ModelLifecycle.finish_build`). Arguments as in
    :class:`~lightningllm.models.Decoder`.
    """

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
        n_kv_heads: int | None,
        hidden_dim: int | None,
        max_seq_len: int,
        dropout: float,
        attention_dropout: float,
        tie_embeddings: bool,
        init_std: float,
        overrides: list[LayerOverride] | None,
        extra_config: dict[str, Any] | None = None,
        cross_attention: AttentionFactory | None = None,
    ) -> None:
        super().__init__()
        model = type(self).__name__
        n_kv_heads = n_kv_heads or n_heads
        _check_shapes(vocab_size, dim, n_layers, n_heads, n_kv_heads)
        _check_values(model, hidden_dim, max_seq_len, dropout, attention_dropout, init_std)
        hidden_dim = hidden_dim or 4 * dim
        factories = {"attention": attention, "ffn": ffn, "norm": norm, "position": position, "block": block}
        _check_knobs_are_not_structural(model, **factories)
        if cross_attention is not None:
            _check_knobs_are_not_structural(model, attention=cross_attention)
            extra_config = {**(extra_config or {}), "cross_attention": spec_of(cross_attention)}
        overrides = [_as_override(o) for o in overrides or []]
        _check_overrides(model, overrides, n_layers)
        self.config = {
            "vocab_size": vocab_size, "dim": dim, "n_layers": n_layers, "n_heads": n_heads,
            **{slot: spec_of(factory) for slot, factory in factories.items()}, "n_kv_heads": n_kv_heads,
            "hidden_dim": hidden_dim, "max_seq_len": max_seq_len, "dropout": dropout,
            "attention_dropout": attention_dropout, "tie_embeddings": tie_embeddings, **(extra_config or {}),
            "init_std": init_std, "overrides": [_override_spec(o) for o in overrides],
        }  # fmt: skip
        self.vocab_size, self.dim, self.n_layers, self.max_seq_len = vocab_size, dim, n_layers, max_seq_len
        self.init_std = init_std

        self.embed = nn.Embedding(vocab_size, dim)
        self.position = position(dim=dim, n_heads=n_heads, head_dim=dim // n_heads, max_seq_len=max_seq_len)
        self.dropout = nn.Dropout(dropout)
        layers = [_layer_factories(i, attention, ffn, overrides) for i in range(n_layers)]

        def cross() -> dict[str, nn.Module]:  # passed only when asked for, so every block layout still fits
            if cross_attention is None:
                return {}
            attn = cross_attention(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, dropout=attention_dropout)
            return {"cross_attention": attn, "norm_cross": norm(dim=dim)}

        self.blocks = nn.ModuleList(
            block(
                attention=layer_attention(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, dropout=attention_dropout),
                ffn=layer_ffn(dim=dim, hidden_dim=hidden_dim, dropout=dropout),
                norm_1=norm(dim=dim),
                norm_2=norm(dim=dim),
                dropout=dropout,
                dim=dim,
                **cross(),
            )
            for layer_attention, layer_ffn in layers
        )
        for blk in self.blocks:
            blk.attention.check_compatible(self.position)
        self.norm = norm(dim=dim) if self.block_class.final_norm else nn.Identity()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TransformerStack:
        """Rebuild from :attr:`config` (plugin specs as ``{class_path, init_args}``)."""
        return cls(**factories_from_config(config))

    def make_cache(self, batch_size: int, max_len: int | None = None) -> list[KVCache]:
        """One empty cache per block for decoding up to ``max_len`` tokens (causal models only), with room for
        prompt tuning's soft tokens too (prefix tuning's attention adds room for its prefix)."""
        self.require_causal_for_cache()
        max_len = (max_len or self.max_seq_len) + soft_token_count(self)
        weight = self.embed.weight
        return [
            blk.attention.make_cache(batch_size, max_len, dtype=weight.dtype, device=weight.device)
            for blk in self.blocks
        ]

    def require_causal_for_cache(self) -> None:
        """Refuse a cache (given or asked for) on a bidirectional model, with the reason."""
        if not self.causal:
            raise ConfigError(
                f"{type(self).__name__} attends bidirectionally, so it has no key/value cache: every new token would "
                "change every earlier position. Caches are for causal models (Decoder, EncoderDecoder)."
            )

    @property
    def output_norm(self) -> nn.Module:
        """The norm after the last block (an identity for post-norm layouts)."""
        return self.norm

    def embed_inputs(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        """Exactly one of input_ids (B, T) and inputs_embeds (B, T, dim) -> token embeddings (B, T, dim)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ConfigError(
                f"{type(self).__name__}.hidden_states takes exactly one of input_ids (B, T) token ids or inputs_embeds "
                "(B, T, dim) embeddings (prompt tuning feeds the latter)."
            )
        return self.embed(input_ids) if inputs_embeds is None else inputs_embeds

    def run_blocks(
        self,
        x: Tensor,
        *,
        positions: Tensor,
        mask: AttentionMask,
        cache: list[KVCache] | None = None,
        context: Tensor | None = None,
        context_mask: AttentionMask | None = None,
        cross_cache: list[KVCache] | None = None,
    ) -> Tensor:
        """Embedded tokens x: (B, T, dim) -> every block, then the final norm -> (B, T, dim).

        Args:
            positions: (B or 1, T) absolute positions of ``x``.
            mask: which keys each query may see.
            cache: one cache per block, filled in place.
            context: (B, S, dim) encoder output for blocks built with cross-attention.
            context_mask: its padding, ``AttentionMask(causal=False, padding=(B, S) bool)``.
            cross_cache: one cross-attention cache per block, filled on the first call.
        """
        for i, blk in enumerate(self.blocks):
            cross = {} if context is None else {
                "context": context, "context_mask": context_mask, "cross_cache": cross_cache[i] if cross_cache else None
            }  # fmt: skip
            x = blk(
                x, position=self.position, positions=positions, mask=mask, cache=cache[i] if cache else None, **cross
            )
        return self.norm(x)

    @property
    def block_class(self) -> type[Block]:
        """The layout class of the blocks: the FSDP auto-wrap and checkpointing unit."""
        return type(self.blocks[0])


def prefix_length(model: nn.Module) -> int:
    """Prefix tuning's keys/values per layer (0 without prefix tuning)."""
    lengths = [blk.attention.prefix_length() for blk in model.blocks if hasattr(blk.attention, "prefix_length")]
    return max(lengths) if lengths else 0


def soft_token_count(model: nn.Module) -> int:
    """Prompt tuning's soft tokens, prepended to a sequence's embeddings (0 without prompt tuning)."""
    soft = model.embed.soft_tokens() if hasattr(getattr(model, "embed", None), "soft_tokens") else None
    return 0 if soft is None else soft.shape[0]


def virtual_token_count(model: nn.Module) -> int:
    """Positions prompt and prefix tuning take before a sequence's tokens (0 without them, or for any model
    without ``blocks``)."""
    return soft_token_count(model) + prefix_length(model) if hasattr(model, "blocks") else 0


def token_positions(model: nn.Module) -> int | None:
    """The positions left for a sequence's own tokens: ``max_seq_len`` less the virtual tokens (None: unbounded)."""
    limit = getattr(model, "max_seq_len", None)
    return None if limit is None else limit - virtual_token_count(model)


def add_virtual_tokens(
    model: nn.Module, x: Tensor, mask: AttentionMask, positions: Tensor | None
) -> tuple[Tensor, AttentionMask, Tensor | None]:
    """Make room for the virtual tokens of prompt and prefix tuning when a sequence starts (no cache yet).

    Prefix tuning's ``p`` keys/values per layer (``attention.prefix_length()``) take positions ``0..p-1``,
    prompt tuning's ``s`` soft tokens (``embed.soft_tokens()``: (s, dim)) are prepended to x and take
    ``p..p+s-1``, and the tokens follow, as in PEFT. Without either, everything is returned unchanged.

    Args:
        model: a stack with ``embed`` and ``blocks``.
        x: embedded tokens (B, T, dim).
        mask: the caller's mask over the T tokens.
        positions: (B or 1, T) the caller's positions, counting from 0 (None: 0..T-1).

    Returns:
        x (B, s + T, dim); the mask with padding (B, p + s + T) and prefix-LM lengths widened so every token
        sees the virtual ones; positions (B or 1, s + T) (None when there are no virtual tokens and none given).

    Raises:
        AdapterError: packed documents (the virtual tokens would belong to one document only), or prefix tuning
            with real tokens at positions that are not consecutive (its keys sit at the positions just before the
            tokens); left padding (masked, at any position) is fine.
    """
    from lightningllm.adapters import AdapterError

    soft = model.embed.soft_tokens() if hasattr(model.embed, "soft_tokens") else None
    n_soft = 0 if soft is None else soft.shape[0]
    n_prefix = prefix_length(model)
    n = n_soft + n_prefix
    if n == 0:
        return x, mask, positions
    if mask.document_ids is not None:
        raise AdapterError(
            "Prompt and prefix tuning cannot run on packed documents (document_ids in the attention mask): every "
            "document needs its own virtual tokens. Turn packing off for this run."
        )
    B, T = x.shape[:2]
    given = positions is not None
    if positions is None:
        positions = torch.arange(T, device=x.device)[None]
    elif n_prefix and not _consecutive(positions, mask.padding):
        raise AdapterError(
            "Prefix tuning needs the real tokens at consecutive positions (its keys and values sit just before "
            "the tokens, as cached keys do); these positions skip or repeat between real tokens. Give each row's "
            "tokens consecutive positions and mark any padding in the mask."
        )
    positions = _after_virtual(n_soft, positions + n_soft) + n_prefix  # soft tokens at p..p+s-1, then the tokens
    if soft is not None:
        x = torch.cat([soft.to(x.dtype)[None].expand(B, -1, -1), x], dim=1)
    prefix = None if mask.prefix_lengths is None else mask.prefix_lengths + n
    keys = mask.key_positions
    if n_prefix and given:  # the cached prefix keys precede tokens whose positions need not count up by index
        keys = _after_virtual(n_prefix, positions)
    return x, dataclasses.replace(mask, padding=_real_first(mask.padding, n), prefix_lengths=prefix,
                                  key_positions=keys), positions  # fmt: skip


def _real_first(padding: Tensor | None, n: int) -> Tensor | None:
    """padding (B, S) with n real keys (the virtual tokens) in front -> (B, n + S); None stays None."""
    return None if padding is None else torch.cat([padding.new_ones(padding.shape[0], n), padding], dim=1)


def _after_virtual(n: int, key_positions: Tensor) -> Tensor:
    """Key positions (B or 1, S) after n virtual keys at 0..n-1 -> (B or 1, n + S)."""
    virtual = torch.arange(n, device=key_positions.device)[None].expand(key_positions.shape[0], -1)
    return torch.cat([virtual.to(key_positions.dtype), key_positions], dim=1)


def _consecutive(positions: Tensor, padding: Tensor | None) -> bool:
    """positions (B or 1, T) step by one between neighbouring real tokens (padding: (B, T) bool, True at real)."""
    steps = positions.diff(dim=1) == 1  # (B or 1, T - 1)
    if padding is not None:
        steps = steps | ~(padding[:, 1:] & padding[:, :-1])
    return bool(steps.all())


def skip_virtual_tokens(
    model: nn.Module, mask: AttentionMask, positions: Tensor | None, cached: int
) -> tuple[AttentionMask, Tensor | None]:
    """On a cached step, shift the caller's positions and padding past the virtual tokens already in the cache.

    The caller counts only its own tokens, at the start (:func:`add_virtual_tokens`) and on every later step, so
    generation with left padding needs no knowledge of prompt or prefix tuning.

    Args:
        model: a stack with ``embed`` and ``blocks``.
        mask: the caller's mask; its padding (B, S) covers the caller's cached tokens and the new ones.
        positions: (B or 1, T) the caller's positions (None: the model continues after the cache).
        cached: the keys in the cache, the n virtual ones included.

    Returns:
        the mask with padding (B, n + S) and, with positions given, the keys' positions (B or 1, n + S) (the
        virtual ones at 0..n-1) and positions + n.
    """
    n = 0 if positions is None and mask.padding is None else virtual_token_count(model)
    if n == 0:
        return mask, positions
    padding = _real_first(mask.padding, n)
    if positions is None:
        return dataclasses.replace(mask, padding=padding), None
    positions = positions + n
    keys = _after_virtual(n, mask.keys_at(positions, cached - n + positions.shape[1]))  # (B or 1, n + S)
    return dataclasses.replace(mask, padding=padding, key_positions=keys), positions


def query_padding(mask: AttentionMask | None, T: int) -> Tensor | None:
    """The padding of the last T keys (the queries of this call, after any cached ones): (B, T) bool or None."""
    return None if mask is None or mask.padding is None else mask.padding[:, -T:]


def factories_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """A stack's keyword arguments from its config: plugin specs become factories, overrides :class:`LayerOverride`."""
    kwargs = dict(config)
    for slot, kind in SLOTS.items():
        kwargs[slot] = factory_of(kwargs[slot], kind)
    if kwargs.get("cross_attention") is not None:
        kwargs["cross_attention"] = factory_of(kwargs["cross_attention"], "attention")
    kwargs["overrides"] = [_as_override(o) for o in kwargs.get("overrides") or []]
    return {**kwargs, **lifecycle_kwargs(kwargs)} if "head" in kwargs else kwargs


def _as_override(override: LayerOverride | dict[str, Any]) -> LayerOverride:
    """A LayerOverride from itself or from its config form (plugin specs as dicts)."""
    if isinstance(override, LayerOverride):
        return override
    specs = {slot: override.get(slot) for slot in ("attention", "ffn")}
    factories = {slot: factory_of(spec, slot) for slot, spec in specs.items() if spec is not None}
    return LayerOverride(layers=list(override["layers"]), **factories)


def _override_spec(override: LayerOverride) -> dict[str, Any]:
    slots = {slot: getattr(override, slot) for slot in ("attention", "ffn")}
    return {"layers": list(override.layers), **{s: spec_of(f) for s, f in slots.items() if f is not None}}


def _layer_factories(layer: int, attention, ffn, overrides: list[LayerOverride]) -> tuple:
    for override in overrides:
        if layer in override.layers:
            attention = override.attention or attention
            ffn = override.ffn or ffn
    return attention, ffn


def _check_overrides(model: str, overrides: list[LayerOverride], n_layers: int) -> None:
    for override in overrides:
        bad = [i for i in override.layers if not 0 <= i < n_layers]
        if bad or not override.layers:
            raise ConfigError(
                f"A layer override names layers {override.layers}, but the model has layers 0..{n_layers - 1}: "
                "give a non-empty list of 0-based layer indices below n_layers."
            )
        slots = {slot: getattr(override, slot) for slot in ("attention", "ffn") if getattr(override, slot)}
        _check_knobs_are_not_structural(model, **slots)


STRUCTURAL = {
    "attention": ("dim", "n_heads", "n_kv_heads", "dropout"),
    "ffn": ("dim", "hidden_dim", "dropout"),
    "norm": ("dim",),
    "position": ("dim", "n_heads", "head_dim", "max_seq_len"),
    "block": ("attention", "ffn", "norm_1", "norm_2", "dropout", "dim", "cross_attention", "norm_cross"),
    "head": ("dim", "vocab_size", "norm", "embedding", "logit_scale"),
}


def _check_knobs_are_not_structural(model: str, **factories) -> None:
    """The model passes structural sizes itself; the same key among a plugin's knobs would be silently lost."""
    for slot, factory in factories.items():
        clash = sorted(set(spec_of(factory)["init_args"]) & set(STRUCTURAL[slot]))
        if clash:
            raise ConfigError(
                f"{slot} init_args set {', '.join(clash)}, which the model passes to every {slot} plugin itself. "
                f"Set {', '.join(clash)} on the model ({model}) instead; a plugin's init_args carry only its own "
                f"knobs (structural keys of {slot}: {', '.join(STRUCTURAL[slot])})."
            )


def _check_values(
    model: str, hidden_dim: int | None, max_seq_len: int, dropout: float, attention_dropout: float, init_std: float
) -> None:
    if hidden_dim is not None:
        check_int(model, "hidden_dim", hidden_dim, minimum=1, extra="(or null for 4 x dim)")
    check_int(model, "max_seq_len", max_seq_len, minimum=1)
    check_probability(model, "dropout", dropout)
    check_probability(model, "attention_dropout", attention_dropout)
    check_number(model, "init_std", init_std, 0.0, extra="(the standard deviation of the initial weights)")


def _check_shapes(vocab_size: int, dim: int, n_layers: int, n_heads: int, n_kv_heads: int) -> None:
    for name, value in {"vocab_size": vocab_size, "dim": dim, "n_layers": n_layers, "n_heads": n_heads,
                        "n_kv_heads": n_kv_heads}.items():  # fmt: skip
        if value < 1:
            raise ConfigError(f"{name}={value} must be a positive integer.")
    if dim % n_heads:
        raise ConfigError(
            f"dim={dim} is not divisible by n_heads={n_heads}: each head needs an equal share of the width. "
            f"Choose n_heads among the divisors of {dim}."
        )
    if n_heads % n_kv_heads:
        raise ConfigError(
            f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}: grouped-query attention shares "
            f"each key/value head among an equal number of query heads. Choose n_kv_heads among the divisors "
            f"of {n_heads} (1 = MQA, {n_heads} = MHA)."
        )
