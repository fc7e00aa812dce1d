"""Local attention: a sliding window or block-sparse neighbourhood, with optional global tokens."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lightningllm.cache import KVCache
from lightningllm.contracts import Position
from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask
from lightningllm.registry import register
from lightningllm_plugins.attention.multi_head import MultiHeadAttention, guarded_sdpa_mask

# Device types where ``use_flex_attention`` takes the FlexAttention path. Measured on a 2-core CPU with
# torch 2.13 (T = 2048-4096, window 128, H = 4, hd = 32, forward only): eager FlexAttention runs its
# reference implementation and is 8-40x *slower* than masked SDPA; compiled FlexAttention is ~11x
# faster than masked SDPA but costs ~20 s of compilation per shape; and FlexAttention has no backward
# on CPU at all (NotImplementedError, eager or compiled). So on CPU the masked SDPA path always runs.
FLEX_DEVICES = ("cuda",)


@register("attention")
class SlidingWindowAttention(MultiHeadAttention):
    """Multi-head attention restricted to a local neighbourhood of each query, plus optional global tokens.

    Sliding window (Longformer, Beltagy et al., 2020; Mistral 7B, Jiang et al., 2023): a query at
    absolute position ``i`` may see a key at position ``j`` only when ``|i - j| < window``. Under the
    model's causal mask that is the Mistral convention: the query itself and the ``window - 1``
    previous keys, ``window`` keys in all; in a bidirectional (or prefix) mask it is the symmetric band.

    Block-sparse local blocks (Sparse Transformer, Child et al., 2019; BigBird, Zaheer et al., 2020):
    with ``block_size`` set, the window is replaced by blocks of ``block_size`` positions,
    ``block(i) = i // block_size``, and a query may see a key only when
    ``|block(i) - block(j)| <= 1``. Under a causal mask a query sees every earlier key of its own block
    and the whole previous block (between ``block_size`` and ``2 * block_size`` keys, itself included);
    bidirectionally it also sees the next block. ``window`` is then unused.

    Global tokens (Longformer): the first ``global_tokens`` positions (position < global_tokens, so in
    packed sequences the first tokens of every document) are visible to every query, and queries at
    those positions see every key; the model's own mask (causality, padding, documents) still applies.

    Everything is computed from absolute ``positions``, so the pattern composes with every positional
    plugin (rotations and score biases), with the model's mask (causal, padding, prefix-LM, packed
    documents, its own window) and with the KV cache: a decoding step sees only the cached keys its
    pattern allows. The cache keeps every position (no rolling buffer), so memory while decoding grows
    as in :class:`MultiHeadAttention`.

    Kernels: the pattern becomes a boolean mask for ``scaled_dot_product_attention``. With
    ``use_flex_attention`` on CUDA, self-attention without a score bias (ALiBi), a filled cache or
    attention dropout, and with a power-of-two head width >= 16, instead runs FlexAttention (compiled
    here unless the model is already being compiled) with a block mask, which skips the blocks the
    pattern excludes. On CPU the masked SDPA path always runs: FlexAttention has no CPU backward and
    is slower there in eager mode (see ``FLEX_DEVICES`` for the measurement). The masked path saves
    no memory: its (T, S) boolean mask costs more than full causal attention, whose SDPA fast path
    needs no mask (CPU, forward + backward of one layer, T = 8192: ~420 MiB against ~180 MiB).

    Args:
        dim: model width.
        n_heads: query heads.
        n_kv_heads: key/value heads (None: n_heads); must divide n_heads.
        dropout: dropout on the attention probabilities while training.
        bias: give the four projections a bias or not.
        qk_norm: RMS-normalise queries and keys per head.
        window: keys within ``|i - j| < window`` of the query are visible (causally: itself and
            ``window - 1`` previous keys); at least 1.
        global_tokens: the first this many positions attend everywhere and are attended by every query.
        block_size: when set, block-sparse local blocks of this many positions replace the window: a
            query sees its own block and the neighbouring blocks (causally: its own and the previous).
        use_flex_attention: run FlexAttention where it is fast and supported (CUDA).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        dropout: float = 0.0,
        bias: bool = False,
        qk_norm: bool = False,
        window: int = 256,
        global_tokens: int = 0,
        block_size: int | None = None,
        use_flex_attention: bool = True,
    ) -> None:
        _check_pattern(window, global_tokens, block_size)
        super().__init__(dim, n_heads, n_kv_heads=n_kv_heads, dropout=dropout, bias=bias, qk_norm=qk_norm)
        self.window, self.global_tokens, self.block_size = window, global_tokens, block_size
        self.use_flex_attention = use_flex_attention

    def local(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        """The local + global pattern, elementwise over broadcastable integer position tensors.

        Args:
            q_positions: absolute query positions, e.g. (B or 1, T, 1).
            k_positions: absolute key positions, e.g. (B or 1, 1, S).

        Returns:
            bool of the broadcast shape, True where the pattern lets the query see the key.
        """
        # compare per-query bounds with the keys: only bool tensors reach the (T, S) broadcast shape
        if self.block_size is None:
            near = (k_positions > q_positions - self.window) & (k_positions < q_positions + self.window)
        else:
            q_block = torch.div(q_positions, self.block_size, rounding_mode="floor")
            k_block = torch.div(k_positions, self.block_size, rounding_mode="floor")
            near = (k_block >= q_block - 1) & (k_block <= q_block + 1)
        if self.global_tokens:
            near = near | (q_positions < self.global_tokens) | (k_positions < self.global_tokens)
        return near

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
        """x: (B, T, dim) -> (B, T, dim); arguments as in :meth:`MultiHeadAttention.forward`.

        Cross-attention (``context``) is not local: it runs as in :class:`MultiHeadAttention`.
        """
        if not self._flex_applies(x, position, cache, context):
            return super().forward(x, position=position, positions=positions, mask=mask, cache=cache, context=context)
        from torch.nn.attention.flex_attention import create_block_mask

        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        if self.q_norm is not None:
            q = self.q_norm(q)
        k, v = self._keys_values(x)  # (B, Hkv, T, hd) each
        q, k = position.rotate(q, k, positions)
        if cache is not None:
            k, v = cache.update(k, v)  # an empty cache: S == T
        mask_mod = self._mask_mod(mask, positions.expand(B, T))
        block_mask = create_block_mask(mask_mod, B, None, T, T, device=x.device)
        y = _flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H * hd)
        return self.o_proj(y)

    def _flex_applies(self, x: Tensor, position: Position, cache: KVCache | None, context: Tensor | None) -> bool:
        """FlexAttention covers self-attention over the new tokens only, without bias or dropout."""
        if not self.use_flex_attention or context is not None or position.adds_bias:
            return False
        if cache is not None and cache.length > 0:
            return False
        if self.training and self.dropout > 0.0:
            return False
        hd = self.head_dim
        kernel_ok = hd >= 16 and hd & (hd - 1) == 0  # the fused kernels want power-of-two head widths
        return x.device.type in FLEX_DEVICES and kernel_ok

    def _mask_mod(self, mask: AttentionMask, positions: Tensor):
        """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)``: the model's mask AND the local pattern.

        Elementwise twin of ``mask.allowed(...) & self.local(...)`` for self-attention without a cache
        (keys are the queries' tokens); ``positions`` is (B, T).
        """
        causal, window = mask.causal, mask.window
        padding = None if mask.padding is None else mask.padding.to(device=positions.device, dtype=torch.bool)
        docs = None if mask.document_ids is None else mask.document_ids.to(positions.device)
        prefix = None if mask.prefix_lengths is None else mask.prefix_lengths.to(positions.device)

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            i, j = positions[b, q_idx], positions[b, kv_idx]
            ok = self.local(i, j)
            if causal:
                seen = j <= i
                if prefix is not None:
                    seen = seen | ((i < prefix[b]) & (j < prefix[b]))
                ok = ok & seen
            if window is not None:
                ok = ok & (i - j < window)
            if docs is not None:
                ok = ok & (docs[b, q_idx] == docs[b, kv_idx])
            if padding is not None:
                ok = ok & padding[b, kv_idx]
            return ok

        return mask_mod

    def _attention_mask(
        self, q: Tensor, k: Tensor, position: Position, positions: Tensor, mask: AttentionMask, cross: bool
    ) -> tuple[Tensor | None, bool, Tensor | None]:
        """SDPA arguments as in :class:`MultiHeadAttention`, with the local pattern folded into the mask."""
        if cross:
            return super()._attention_mask(q, k, position, positions, mask, cross)
        T, S = q.shape[2], k.shape[2]
        if T == S:  # no past keys: the keys are the queries' own tokens (packed positions included)
            k_positions = positions
        else:  # S - T cached keys precede the new ones at consecutive positions
            k_positions = torch.arange(S, device=positions.device) + (positions[:, :1] - (S - T))  # (B, S)
        allowed = self.local(positions[:, :, None], k_positions[:, None, :])[:, None]  # (B or 1, 1, T, S)
        model_allowed = mask.allowed(positions, k_positions)  # (B or 1, 1, T or 1, S) or None
        if model_allowed is not None:
            allowed = allowed & model_allowed
        return guarded_sdpa_mask(allowed, position.bias(positions, k_positions), q.dtype)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_attention():
    """FlexAttention, compiled unless an enclosing ``torch.compile`` already traces it."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention()


def _check_pattern(window: int, global_tokens: int, block_size: int | None) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(
            f"SlidingWindowAttention window={window!r} must be an integer >= 1: the number of keys a query "
            "sees under a causal mask, itself included (window=1: each token sees only itself)."
        )
    if isinstance(global_tokens, bool) or not isinstance(global_tokens, int) or global_tokens < 0:
        raise ConfigError(
            f"SlidingWindowAttention global_tokens={global_tokens!r} must be an integer >= 0: how many leading "
            "positions attend to and are attended by every token (0: none)."
        )
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ConfigError(
            f"SlidingWindowAttention block_size={block_size!r} must be None (a token-level sliding window) or an "
            "integer >= 1: the length of the local blocks of block-sparse attention."
        )
