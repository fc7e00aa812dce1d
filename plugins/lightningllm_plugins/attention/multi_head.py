"""Multi-head attention with grouped key/value heads (MHA, GQA, MQA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightningllm.cache import KVCache
from lightningllm.contracts import Attention, Position
from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask
from lightningllm.registry import register


@register("attention")
class MultiHeadAttention(Attention):
    """Scaled dot-product attention over ``n_heads`` query heads sharing ``n_kv_heads`` key/value heads.

    ``n_kv_heads == n_heads`` is multi-head attention ("Attention Is All You Need",
    Vaswani et al., 2017); ``n_kv_heads == 1`` is multi-query attention (Shazeer, 2019);
    anything in between is grouped-query attention (Ainslie et al., 2023), where query
    head ``h`` reads key/value head ``h // (n_heads // n_kv_heads)``. Optional QK-norm
    RMS-normalises queries and keys per head before the rotation (Dehghani et al., 2023;
    OLMo 2, Qwen 3).

    Notation: B batch, T query positions, S key positions, H = n_heads, Hkv = n_kv_heads,
    hd = head_dim (by default dim // n_heads).

    ``head_dim`` may differ from ``dim // n_heads`` (T5 v1.1 small: dim 512, 6 heads of 64; Gemma):
    queries, keys and values are then projected to ``H * hd`` (``Hkv * hd``) channels and ``o_proj``
    maps the ``H * hd`` concatenated heads back to ``dim``. The model builds its position plugin for
    ``dim // n_heads``, so a plugin that rotates queries and keys (RoPE) must have been built for this
    width (see :meth:`check_compatible`); score biases (ALiBi, RelativePositionBias) and embedding
    plugins do not care.

    Args:
        dim: model width.
        n_heads: query heads.
        n_kv_heads: key/value heads (None: n_heads); must divide n_heads.
        dropout: dropout on the attention probabilities while training.
        bias: give the four projections a bias (GPT-2, Qwen) or not (Llama).
        qk_norm: RMS-normalise queries and keys per head, with a learnable scale each.
        softmax_scale: factor on the scores ``q . k`` before the softmax (None: ``1/sqrt(head_dim)``, as
            in Vaswani et al.; T5 uses 1, having folded the scaling into its initialisation).
        head_dim: width of each query/key/value head (None: ``dim // n_heads``); a positive integer.
    """

    #: reads its keys' positions from the mask, so compiled decoding may give it a static KVCache (a class says
    #: so itself: subclasses do not inherit it, see lightningllm.compiled_step.check_static)
    static_cache = True

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        dropout: float = 0.0,
        bias: bool = False,
        qk_norm: bool = False,
        softmax_scale: float | None = None,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        _check(dim, n_heads, n_kv_heads, dropout, softmax_scale, head_dim)
        self.dim, self.n_heads, self.n_kv_heads = dim, n_heads, n_kv_heads
        self.head_dim = dim // n_heads if head_dim is None else head_dim
        self.dropout, self.softmax_scale = dropout, softmax_scale
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None

    def reset_parameters(self) -> None:
        """QK-norm scales to one; the projections keep the model's initialisation."""
        for module in (self.q_norm, self.k_norm):
            if module is not None:
                module.reset_parameters()

    def check_compatible(self, position: Position) -> None:
        """Refuse a position plugin that rotates queries and keys of another width than ``head_dim``.

        The model builds its position plugin with ``head_dim = dim // n_heads``; a rotation (RoPE) built
        for that width cannot rotate heads of another ``head_dim``. Score biases and embeddings are fine.

        Args:
            position: the model's positional plugin.
        """
        if type(position).rotate is Position.rotate:
            return
        width = getattr(position, "head_dim", self.dim // self.n_heads)  # models build it with dim // n_heads
        if width != self.head_dim:
            name = type(position).__name__
            raise ConfigError(
                f"{type(self).__name__} has head_dim={self.head_dim} but the position plugin {name} rotates "
                f"queries and keys of head_dim={width} (the model builds it with dim // n_heads = "
                f"{self.dim // self.n_heads}), so it cannot rotate these heads. Leave the attention's head_dim "
                f"unset (or set it to {width}), or use a position plugin that does not rotate (ALiBi, "
                "RelativePositionBias, LearnedPosition, Sinusoidal, NoPosition)."
            )

    def forward(
        self,
        x: Tensor,
        *,
        position: Position,
        positions: Tensor,
        mask: AttentionMask,
        cache: KVCache | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim).

        Args:
            position: the model's positional plugin; ``rotate`` and ``bias`` apply to self-attention only.
            positions: (B or 1, T) absolute positions of ``x``.
            mask: which keys each query may see. For cross-attention only its ``padding``
                (B, S) over the context is used: every query sees every real context token.
            cache: this layer's cache. Self-attention appends the new keys/values; cross-attention
                fills it with the context's keys/values on the first call and reuses them afterwards.
            context: (B, S, dim) encoder output for cross-attention.
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if context is None:
            k, v = self._keys_values(x)  # (B, Hkv, T, hd) each
            q, k = position.rotate(q, k, positions)
            if cache is not None:
                k, v = cache.update(k, v)  # (B, Hkv, S, hd): past and new
        elif cache is not None and cache.length > 0:
            k, v = cache.k[:, :, : cache.length], cache.v[:, :, : cache.length]  # (B, Hkv, S, hd)
        else:
            k, v = self._keys_values(context)  # (B, Hkv, S, hd)
            if cache is not None:
                k, v = cache.update(k, v)
        attn_mask, is_causal, has_key = self._attention_mask(q, k, position, positions, mask, context is not None)

        dropout_p = self.dropout if self.training else 0.0
        if self.n_kv_heads != self.n_heads and not _flash_can_group(q, attn_mask):
            groups = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(groups, dim=1)  # (B, H, S, hd)
            v = v.repeat_interleave(groups, dim=1)
        grouped = k.shape[1] != self.n_heads
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=grouped,
        )  # (B, H, T, hd)
        if has_key is not None:
            y = y.masked_fill(~has_key, 0.0)  # queries that may see no key output zeros, not NaN
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H * hd)
        return self.o_proj(y)

    def _keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, S, dim) -> keys, values (B, Hkv, S, hd)."""
        B, S, _ = x.shape
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v

    def _attention_mask(
        self, q: Tensor, k: Tensor, position: Position, positions: Tensor, mask: AttentionMask, cross: bool
    ) -> tuple[Tensor | None, bool, Tensor | None]:
        """The cheapest SDPA arguments: (attn_mask, is_causal, has_key).

        attn_mask is None, (B or 1, 1, T, S) bool, or (B or 1, H, T, S) additive float;
        has_key, (B or 1, 1, T, 1) bool, marks queries that see at least one key (None: all do).
        """
        T, S = q.shape[2], k.shape[2]
        if cross:
            if mask.padding is None:
                return None, False, None
            allowed = AttentionMask(causal=False, padding=mask.padding).allowed(positions, positions)
            return guarded_sdpa_mask(allowed, None, q.dtype)
        return self_attention_sdpa_mask(T, S, position, positions, mask, q.dtype)

    def make_cache(self, batch_size: int, max_len: int, **tensor_kwargs) -> KVCache:
        """An empty cache of ``n_kv_heads`` keys/values for ``max_len`` positions.

        Args:
            batch_size: B.
            max_len: the most positions to hold.
            tensor_kwargs: ``dtype`` and ``device`` of the cache.
        """
        return KVCache(batch_size, self.n_kv_heads, max_len, self.head_dim, **tensor_kwargs)


def self_attention_sdpa_mask(
    T: int, S: int, position: Position, positions: Tensor, mask: AttentionMask, dtype: torch.dtype
) -> tuple[Tensor | None, bool, Tensor | None]:
    """The cheapest SDPA arguments (attn_mask, is_causal, has_key) for T queries over S keys of their own sequence.

    The S - T keys before the queries come from a cache, at the consecutive positions before
    ``positions`` (or at ``mask.key_positions``, for a static cache). attn_mask is None (SDPA's
    ``is_causal`` fast path, or every key visible), (B or 1, 1, T, S) bool, or (B or 1, H, T, S) additive
    float when the position plugin adds a score bias; has_key, (B or 1, 1, T, 1) bool, marks queries that
    see at least one key (None: all do).
    """
    # the keys' positions are not needed: causal over the queries' own keys, or one new token that sees every cached
    # key (eager only: compiled with dynamic shapes, T == S is symbolic and SDPA's is_causal must be a real bool)
    if mask.is_plain_causal() and not position.adds_bias and T in (1, S) and not torch.compiler.is_compiling():
        return None, T == S, None
    k_positions = mask.keys_at(positions, S)  # (B or 1, S)
    bias = position.bias(positions, k_positions)  # (B or 1, H, T, S) or None
    if bias is None and mask.is_plain_causal():
        if T == S:
            return None, True, None
        if T == 1:  # one new token sees every cached key
            return None, False, None
    return guarded_sdpa_mask(mask.allowed(positions, k_positions), bias, dtype)


def guarded_sdpa_mask(
    allowed: Tensor | None, bias: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor | None, bool, Tensor | None]:
    """Combine the boolean mask and the bias; rows without any allowed key attend everywhere (zeroed later)."""
    has_key = None
    if allowed is not None:
        has_key = allowed.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
        allowed = allowed | ~has_key
    if bias is None:
        return allowed, False, has_key
    bias = bias.to(dtype)
    if allowed is not None:
        bias = bias.masked_fill(~allowed, float("-inf"))
    return bias, False, has_key


def _flash_can_group(q: Tensor, attn_mask: Tensor | None) -> bool:
    """Whether SDPA may pick flash attention, the one fused kernel that reads grouped k/v in place.

    The memory-efficient kernel and the CPU kernels refuse ``enable_gqa``, so elsewhere the
    key/value heads are expanded before the call to keep a fused kernel eligible.
    """
    return attn_mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _check(
    dim: int,
    n_heads: int,
    n_kv_heads: int,
    dropout: float,
    softmax_scale: float | None = None,
    head_dim: int | None = None,
) -> None:
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1):
        raise ConfigError(
            f"MultiHeadAttention head_dim={head_dim!r} must be None (dim // n_heads) or a positive integer: the "
            "width of each query/key/value head (T5 v1.1 small: dim 512, n_heads 6, head_dim 64)."
        )
    if n_heads < 1 or n_kv_heads < 1 or (head_dim is None and dim % n_heads):
        raise ConfigError(
            f"MultiHeadAttention needs dim={dim} to split evenly into n_heads={n_heads} heads of at least one "
            f"channel (and n_kv_heads={n_kv_heads} >= 1). Choose n_heads among the divisors of {dim}."
        )
    if n_heads % n_kv_heads:
        raise ConfigError(
            f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}: each key/value head serves an equal "
            f"group of query heads. Choose n_kv_heads among the divisors of {n_heads} (1 = MQA, {n_heads} = MHA)."
        )
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"Attention dropout={dropout} must be in [0, 1).")
    if softmax_scale is not None and not softmax_scale > 0:
        raise ConfigError(
            f"MultiHeadAttention softmax_scale={softmax_scale} must be positive (None: 1/sqrt(head_dim))."
        )
