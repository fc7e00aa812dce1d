"""Prefix tuning: ``n`` learned keys and values per layer that every token attends to (Li & Liang, 2021).

Each self-attention of the model is wrapped by a :class:`PrefixAttention` that keeps it as ``base_layer`` and
holds the prefixes by name. The prefix enters through the attention contract's cache: when a sequence starts,
the wrapper hands the attention a cache already holding the prefix keys/values (a fresh :class:`PrefixCache`
while training, or the generation cache filled with them), so any attention plugin that caches keys and values
(:class:`~lightningllm.cache.KVCache`) takes a prefix unchanged; the model shifts the tokens' positions and
widens the mask by ``n`` (:func:`lightningllm.models.base.add_virtual_tokens`), as PEFT does with its
``past_key_values``. The prefix takes the form of what the attention caches per token (:func:`cache_form`):
keys and values for multi-head attention, and for MultiHeadLatentAttention (whose
:class:`~lightningllm_plugins.attention.latent.LatentCache` holds a key/value latent and a shared rotated rope
key per token) ``n`` learned latents and rope keys, which the attention up-projects to per-head keys and
values like its tokens' (so its absorbed decoding form applies to the prefix too). Attention plugins without
keys and values to prepend (LinearAttention's running state) are refused by name.

The optional reparametrisation computes each layer's keys and values from ``n`` embeddings through a
``Linear -> tanh -> Linear`` MLP (Li & Liang's stabilisation), one MLP per layer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightningllm.adapters import AdapterError, check_adapter_name, parameters_of, train_only
from lightningllm.cache import KVCache
from lightningllm.contracts import Adapter, AdapterModule, Attention, Position
from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask
from lightningllm.registry import register
from lightningllm_plugins.attention.latent import LatentCache

log = logging.getLogger(__name__)


class PrefixCache(KVCache):
    """A cache that starts with the prefix keys/values and grows by concatenation (no preallocation, autograd-safe).

    Args:
        k, v: (B, Hkv, n, hd) the prefix.
    """

    def __init__(self, k: Tensor, v: Tensor) -> None:
        nn.Module.__init__(self)
        self.k, self.v, self.length = k, v, k.shape[2]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v: (B, Hkv, T, hd) -> every key/value so far (B, Hkv, n + T, hd)."""
        self.k, self.v = torch.cat([self.k, k.to(self.k.dtype)], 2), torch.cat([self.v, v.to(self.v.dtype)], 2)
        self.length = self.k.shape[2]
        return self.k, self.v


class PrefixLatentCache(LatentCache):
    """A latent cache that starts with the prefix latents and rope keys and grows by concatenation.

    Args:
        c_kv: (B, n, kv_lora_rank), k_rope: (B, n, rope_head_dim) the prefix.
    """

    def __init__(self, c_kv: Tensor, k_rope: Tensor) -> None:
        nn.Module.__init__(self)
        self.c_kv, self.k_rope, self.length = c_kv, k_rope, c_kv.shape[1]

    @property
    def max_len(self) -> int:
        return self.c_kv.shape[1]

    def update(self, c_kv: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        """c_kv (B, T, r), k_rope (B, T, rope) -> everything so far, (B, n + T, r) and (B, n + T, rope)."""
        self.c_kv = torch.cat([self.c_kv, c_kv.to(self.c_kv.dtype)], 1)
        self.k_rope = torch.cat([self.k_rope, k_rope.to(self.k_rope.dtype)], 1)
        self.length = self.c_kv.shape[1]
        return self.c_kv, self.k_rope


@dataclass(frozen=True)
class CacheForm:
    """What an attention plugin caches per token, so a prefix can be learned in that form.

    Args:
        cache: the growing cache that starts with the prefix while training (no generation cache given).
        shapes: {parameter name: the shape of one token's entry}, in the order ``cache.update`` takes them.
        token_dim: where the token axis goes in an unbatched entry ((Hkv, n, hd): 1; (n, r): 0).
    """

    cache: type[nn.Module]
    shapes: dict[str, tuple[int, ...]]
    token_dim: int


def cache_form(attention: nn.Module) -> CacheForm | None:
    """The form of ``attention``'s cache: keys and values (KVCache), a latent and rope key (MLA), or None."""
    cache = attention.make_cache(1, 1, device="meta")
    if type(cache) is KVCache and hasattr(attention, "k_proj"):
        head = (attention.n_kv_heads, attention.head_dim)
        return CacheForm(PrefixCache, {"keys": head, "values": head}, token_dim=1)
    if type(cache) is LatentCache:
        shapes = {"latents": (attention.kv_lora_rank,), "rope_keys": (attention.rope_head_dim,)}
        return CacheForm(PrefixLatentCache, shapes, token_dim=0)
    return None


class Prefix(nn.Module):
    """One adapter's ``n`` cache entries in the attention's form (keys and values (Hkv, n, hd) each, or latents
    (n, r) and rope keys (n, rope)): learned directly (Normal(0, 1), PEFT's init) or through the reparametrisation
    MLP from ``n`` embeddings (dim)."""

    def __init__(self, n_tokens: int, form: CacheForm, dim: int, hidden: int | None, **like) -> None:
        super().__init__()
        self.n_tokens, self.form = n_tokens, form
        self.names = list(form.shapes)
        if hidden is None:
            for name, shape in form.shapes.items():
                shape = (*shape[: form.token_dim], n_tokens, *shape[form.token_dim :])
                self.register_parameter(name, nn.Parameter(torch.empty(shape, **like)))
            self.embedding, self.mlp = None, None
        else:
            width = sum(math.prod(shape) for shape in form.shapes.values())
            self.embedding = nn.Parameter(torch.empty(n_tokens, dim, **like))
            self.mlp = nn.Sequential(nn.Linear(dim, hidden, **like), nn.Tanh(), nn.Linear(hidden, width, **like))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            direct = [getattr(self, name) for name in self.names] if self.mlp is None else [self.embedding]
            for param in direct:
                if not param.is_meta:
                    nn.init.normal_(param)
            if self.mlp is not None:
                for layer in (self.mlp[0], self.mlp[2]):
                    if not layer.weight.is_meta:
                        layer.reset_parameters()

    def forward(self) -> list[Tensor]:
        """The prefix entries in the order of ``form.shapes``, unbatched (e.g. keys and values (Hkv, n, hd))."""
        if self.mlp is None:
            return [getattr(self, name) for name in self.names]
        shapes = list(self.form.shapes.values())
        flat = self.mlp(self.embedding).split([math.prod(shape) for shape in shapes], -1)  # (n, width) each
        return [f.view(self.n_tokens, *shape).movedim(0, self.form.token_dim) for f, shape in zip(flat, shapes)]


class PrefixAttention(AdapterModule, Attention):
    """Self-attention whose keys/values start with the active prefixes when a sequence starts.

    Args:
        base_layer: the frozen attention it wraps (its parameters keep their names under ``base_layer.``).
    """

    def __init__(self, base_layer: Attention) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.prefix = nn.ModuleDict()
        self.enabled, self.active, self.merged = True, [], []

    def add_adapter(self, name: str, n_tokens: int, dim: int, hidden: int | None) -> None:
        """Add ``n_tokens`` cache entries (keys/values, or latents) under ``name`` and make them active."""
        weight = next(self.base_layer.parameters())
        like = {"device": weight.device, "dtype": weight.dtype}
        self.prefix[name] = Prefix(n_tokens, cache_form(self.base_layer), dim, hidden, **like)
        self.active.append(name)

    def adapter_names(self) -> list[str]:
        return list(self.prefix)

    def adapter_params(self, name: str) -> list[str]:
        return [f"prefix.{name}.{param}" for param, _ in self.prefix[name].named_parameters()]

    def prefix_length(self) -> int:
        """How many keys/values precede the tokens when a sequence starts (0 when disabled)."""
        if not self.enabled:
            return 0
        return sum(self.prefix[name].n_tokens for name in self.active)

    def prefix_entries(self, batch_size: int) -> list[Tensor]:
        """The active prefixes in order, expanded over the batch in the cache's form: keys and values
        (B, Hkv, n, hd), or latents (B, n, r) and rope keys (B, n, rope)."""
        prefixes = [self.prefix[name]() for name in self.active]
        token_dim = self.prefix[self.active[0]].form.token_dim
        entries = [torch.cat(parts, token_dim) for parts in zip(*prefixes)]
        return [entry[None].expand(batch_size, *entry.shape) for entry in entries]

    def forward(
        self,
        x: Tensor,
        *,
        position: Position,
        positions: Tensor,
        mask: AttentionMask,
        cache: KVCache | None = None,
        context: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim); the model has shifted ``positions`` and widened ``mask`` by the prefix."""
        if self.prefix_length() and context is None and (cache is None or cache.length == 0):
            entries = self.prefix_entries(x.shape[0])  # e.g. keys and values (B, Hkv, n, hd)
            if cache is None:
                cache = self.prefix[self.active[0]].form.cache(*entries)
            else:
                dtype = next(cache.buffers()).dtype
                cache.update(*(entry.to(dtype) for entry in entries))
        return self.base_layer(x, position=position, positions=positions, mask=mask, cache=cache, context=context,
                               **kwargs)  # fmt: skip

    def make_cache(self, batch_size: int, max_len: int, **tensor_kwargs) -> KVCache:
        """The base attention's cache, with room for the prefix too."""
        return self.base_layer.make_cache(batch_size, max_len + self.prefix_length(), **tensor_kwargs)

    def check_compatible(self, position: Position) -> None:
        self.base_layer.check_compatible(position)

    def reset_parameters(self) -> None:
        """Each prefix by its own rule; the attention is left alone."""
        for prefix in self.prefix.values():
            prefix.reset_parameters()

    def merge(self) -> None:
        raise AdapterError(
            "Cannot merge a prefix-tuning adapter: its keys and values are extra attention inputs, not a change of "
            "any weight, so no merged model computes the same outputs. Keep it unmerged (save_adapter writes it)."
        )

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def unload(self) -> nn.Module:
        return self.base_layer

    def extra_repr(self) -> str:
        return f"prefixes={ {name: p.n_tokens for name, p in self.prefix.items()} }, active={self.active}"


@register("adapter")
class PrefixTuning(Adapter):
    """Learned keys and values prepended in every layer's self-attention; everything else is frozen.

    Args:
        n_tokens: how many keys/values per layer (PEFT's ``num_virtual_tokens``).
        reparametrize: compute them from ``n_tokens`` embeddings through an MLP (PEFT's ``prefix_projection``).
        hidden: the MLP's hidden width (None: the model's dim).
        name: the adapter's name; another PrefixTuning with another name adds its keys after this one's.
    """

    def __init__(self, n_tokens: int = 20, reparametrize: bool = False, hidden: int | None = None,
                 name: str = "default") -> None:  # fmt: skip
        _check_options(n_tokens, hidden, name)
        self.n_tokens, self.reparametrize, self.hidden, self.name = n_tokens, reparametrize, hidden, name
        self.config = {"n_tokens": n_tokens, "reparametrize": reparametrize, "hidden": hidden, "name": name}

    def apply(self, model: nn.Module) -> None:
        """Wrap every block's self-attention (or add to its wrapper), freeze all but this adapter."""
        if not getattr(model, "takes_virtual_tokens", False):
            raise ConfigError(
                f"PrefixTuning needs a model that shifts its tokens behind the prefix (Decoder); "
                f"{type(model).__name__} does not. Use LoRA or another adapter on it."
            )
        for i, blk in enumerate(model.blocks):
            self._check_fits(i, blk.attention)
        hidden = (self.hidden or model.dim) if self.reparametrize else None
        for blk in model.blocks:
            if not isinstance(blk.attention, PrefixAttention):
                blk.attention = PrefixAttention(blk.attention)
            blk.attention.add_adapter(self.name, self.n_tokens, model.dim, hidden)
        trainable = train_only(model, parameters_of([blk.attention for blk in model.blocks], self.name))
        log.info("PrefixTuning %r (%d keys/values per layer%s) on %d layers: %s", self.name, self.n_tokens,
                 ", reparametrized" if hidden else "", len(model.blocks), trainable)  # fmt: skip

    def _check_fits(self, i: int, attention: nn.Module) -> None:
        if isinstance(attention, PrefixAttention):
            if self.name in attention.adapter_names():
                raise ConfigError(
                    f"blocks.{i}.attention already holds a prefix named {self.name!r}; give the second PrefixTuning "
                    f"another name (name: ...). It holds: {', '.join(attention.adapter_names())}."
                )
            return
        if cache_form(attention) is None:
            cache = attention.make_cache(1, 1, device="meta")
            raise ConfigError(
                f"PrefixTuning prepends keys and values, but the attention plugin {type(attention).__name__} of "
                f"blocks.{i} caches {type(cache).__name__}, not keys and values (LinearAttention keeps a running "
                "state). Use it with MultiHeadAttention, SlidingWindowAttention or MultiHeadLatentAttention, or pick "
                "LoRA / prompt tuning for this model."
            )


def _check_options(n_tokens: int, hidden: int | None, name: str) -> None:
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens <= 0:
        raise ConfigError(f"PrefixTuning n_tokens={n_tokens!r} is not a positive integer: give e.g. 20 keys/values.")
    if hidden is not None and (not isinstance(hidden, int) or isinstance(hidden, bool) or hidden <= 0):
        raise ConfigError(f"PrefixTuning hidden={hidden!r} must be None (the model's dim) or a positive integer.")
    check_adapter_name("PrefixTuning", name)
