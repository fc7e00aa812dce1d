"""Prefix tuning: ``n`` learned keys and values per layer that every token attends to (Li & Liang, 2021).

Each self-attention of the model is wrapped by a :class:`PrefixAttention` that keeps it as ``base_layer`` and
holds the prefixes by name. The prefix enters through the attention contract's cache: when a sequence starts,
the wrapper hands the attention a cache already holding the prefix keys/values (a fresh :class:`PrefixCache`
while training, or the generation cache filled with them), so any attention plugin that caches keys and values
(:class:`~lightningllm.cache.KVCache`) takes a prefix unchanged; the model shifts the tokens' positions and
widens the mask by ``n`` (:func:`lightningllm.models.base.add_virtual_tokens`), as PEFT does with its
``past_key_values``. Attention plugins without keys and values to prepend (LinearAttention's running state,
MultiHeadLatentAttention's latent cache) are refused by name.

The optional reparametrisation computes each layer's keys and values from ``n`` embeddings through a
``Linear -> tanh -> Linear`` MLP (Li & Liang's stabilisation), one MLP per layer.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from lightningllm.adapters import AdapterError
from lightningllm.cache import KVCache
from lightningllm.contracts import Adapter, AdapterModule, Attention, Position
from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask
from lightningllm.registry import register

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


class Prefix(nn.Module):
    """One adapter's keys and values (Hkv, n, hd) each: learned directly (Normal(0, 1), PEFT's init) or through
    the reparametrisation MLP from ``n`` embeddings (dim)."""

    def __init__(self, n_tokens: int, n_kv_heads: int, head_dim: int, dim: int, hidden: int | None, **like) -> None:
        super().__init__()
        self.n_tokens, self.n_kv_heads, self.head_dim = n_tokens, n_kv_heads, head_dim
        width = n_kv_heads * head_dim
        if hidden is None:
            self.keys = nn.Parameter(torch.empty(n_kv_heads, n_tokens, head_dim, **like))
            self.values = nn.Parameter(torch.empty(n_kv_heads, n_tokens, head_dim, **like))
            self.embedding, self.mlp = None, None
        else:
            self.embedding = nn.Parameter(torch.empty(n_tokens, dim, **like))
            self.mlp = nn.Sequential(nn.Linear(dim, hidden, **like), nn.Tanh(), nn.Linear(hidden, 2 * width, **like))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for param in (self.keys, self.values) if self.mlp is None else (self.embedding,):
                if not param.is_meta:
                    nn.init.normal_(param)
            if self.mlp is not None:
                for layer in (self.mlp[0], self.mlp[2]):
                    if not layer.weight.is_meta:
                        layer.reset_parameters()

    def forward(self) -> tuple[Tensor, Tensor]:
        """The prefix keys and values, (Hkv, n, hd) each."""
        if self.mlp is None:
            return self.keys, self.values
        kv = self.mlp(self.embedding).view(self.n_tokens, 2, self.n_kv_heads, self.head_dim)  # (n, 2, Hkv, hd)
        return kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)


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
        """Add ``n_tokens`` keys/values under ``name`` and make them active."""
        base = self.base_layer
        like = {"device": base.k_proj.weight.device, "dtype": base.k_proj.weight.dtype}
        self.prefix[name] = Prefix(n_tokens, base.n_kv_heads, base.head_dim, dim, hidden, **like)
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

    def prefix_keys_values(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """The active prefixes in order, expanded over the batch: (B, Hkv, n, hd) each."""
        pairs = [self.prefix[name]() for name in self.active]
        k, v = torch.cat([k for k, _ in pairs], 1), torch.cat([v for _, v in pairs], 1)
        return k[None].expand(batch_size, -1, -1, -1), v[None].expand(batch_size, -1, -1, -1)

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
            k, v = self.prefix_keys_values(x.shape[0])  # (B, Hkv, n, hd) each
            if cache is None:
                cache = PrefixCache(k, v)
            else:
                cache.update(k.to(cache.k.dtype), v.to(cache.v.dtype))
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
        mine = set()
        for blk in model.blocks:
            if not isinstance(blk.attention, PrefixAttention):
                blk.attention = PrefixAttention(blk.attention)
            blk.attention.add_adapter(self.name, self.n_tokens, model.dim, hidden)
            mine |= {id(p) for p in blk.attention.prefix[self.name].parameters()}
        for param in model.parameters():
            param.requires_grad_(id(param) in mine)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("PrefixTuning %r (%d keys/values per layer%s) on %d layers: %d of %d parameters train (%.3f%%)",
                 self.name, self.n_tokens, ", reparametrized" if hidden else "", len(model.blocks), trainable, total,
                 100 * trainable / total)  # fmt: skip

    def _check_fits(self, i: int, attention: nn.Module) -> None:
        if isinstance(attention, PrefixAttention):
            if self.name in attention.adapter_names():
                raise ConfigError(
                    f"blocks.{i}.attention already holds a prefix named {self.name!r}; give the second PrefixTuning "
                    f"another name (name: ...). It holds: {', '.join(attention.adapter_names())}."
                )
            return
        cache = attention.make_cache(1, 1, device="meta")
        if type(cache) is not KVCache or not hasattr(attention, "k_proj"):
            raise ConfigError(
                f"PrefixTuning prepends keys and values, but the attention plugin {type(attention).__name__} of "
                f"blocks.{i} caches {type(cache).__name__}, not keys and values (LinearAttention keeps a running "
                "state, MultiHeadLatentAttention a latent). Use it with MultiHeadAttention or SlidingWindowAttention, "
                "or pick LoRA / prompt tuning for this model."
            )


def _check_options(n_tokens: int, hidden: int | None, name: str) -> None:
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens <= 0:
        raise ConfigError(f"PrefixTuning n_tokens={n_tokens!r} is not a positive integer: give e.g. 20 keys/values.")
    if hidden is not None and (not isinstance(hidden, int) or isinstance(hidden, bool) or hidden <= 0):
        raise ConfigError(f"PrefixTuning hidden={hidden!r} must be None (the model's dim) or a positive integer.")
    if not name or "." in name:
        raise ConfigError(f"PrefixTuning name={name!r} must be a non-empty name without dots (a ModuleDict key).")
