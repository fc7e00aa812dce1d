"""Local attention: a sliding window or block-sparse neighbourhood, with optional global tokens."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
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
# on CPU at all (NotImplementedError, eager or compiled). So on CPU masked SDPA (banded or full) always runs.
FLEX_DEVICES = ("cuda",)

# Smallest number of query positions per chunk of the banded path when ``chunk_size`` is None (the default
# chunk is max(MIN_BAND_CHUNK, reach + 1)): smaller chunks mean more, smaller kernel calls.
MIN_BAND_CHUNK = 64

# A chunk plan: (first query, end query, key index ranges [(lo, hi), ...]) per chunk, in query order.
BandPlan = list[tuple[int, int, tuple[tuple[int, int], ...]]]


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
    as in :class:`MultiHeadAttention`, but a decoding step reads only the band of it (path 2 below).

    Kernels, self-attention picks the first that applies:

    1. FlexAttention, with ``use_flex_attention`` on CUDA, for self-attention without a score bias
       (ALiBi), a filled cache or attention dropout, and with a power-of-two head width >= 16 (compiled
       here unless the model is already being compiled), with a block mask that skips the blocks the
       pattern excludes. Not on CPU: FlexAttention has no CPU backward and is slower there in eager
       mode (see ``FLEX_DEVICES`` for the measurement).
    2. The banded path (any device, training and decoding alike): the queries are cut into chunks of
       ``chunk_size`` positions (the global queries, if any, form a chunk of their own), and each chunk
       calls ``scaled_dot_product_attention`` on the keys it can reach only: the band from ``reach``
       positions before its first query to ``reach`` after its last (to itself under a causal mask
       without prefix), ``reach = window - 1`` (``2 * block_size - 1`` for blocks, fewer under the
       mask's own window), plus the global keys. Memory, autograd's saved tensors included, is
       O(T * (chunk_size + 2 * reach + global_tokens)) instead of O(T * S); the global-query chunk costs
       O(global_tokens * S). It runs when (a) one chunk would not already reach every key
       (``chunk_size + reach (+ reach) + global keys < S``; otherwise a single full-mask call is no
       larger), (b) the band in index space holds every pair the pattern allows: the positions step by
       exactly 1 along each row (the model's default positions, every decoding step), or, without
       global tokens and without a cache, they restart only where ``document_ids`` (non-decreasing
       along the row) change (packed documents), and (c) the model is not being traced by
       ``torch.compile`` (the plan depends on tensor values).
    3. Otherwise the full path: one call with a (T, S) boolean mask. It is the reference the banded
       path is tested against, and costs O(T * S) memory.

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
        chunk_size: query positions per chunk of the banded path (None: ``max(64, reach + 1)``, see
            above); at least 1.
        head_dim: width of each head (None: ``dim // n_heads``), as in :class:`MultiHeadAttention`.
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
        chunk_size: int | None = None,
        head_dim: int | None = None,
    ) -> None:
        _check_pattern(window, global_tokens, block_size, chunk_size)
        super().__init__(
            dim, n_heads, n_kv_heads=n_kv_heads, dropout=dropout, bias=bias, qk_norm=qk_norm, head_dim=head_dim
        )
        self.window, self.global_tokens, self.block_size = window, global_tokens, block_size
        self.use_flex_attention, self.chunk_size = use_flex_attention, chunk_size

    @property
    def reach(self) -> int:
        """How many positions apart a query and a local (non-global) key it sees can be, at most."""
        return self.window - 1 if self.block_size is None else 2 * self.block_size - 1

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
        B, T, _ = x.shape
        if self._flex_applies(x, position, cache, context):
            return self._flex_forward(x, position, positions, mask, cache)
        plan = None
        if context is None:
            plan = self.band_plan(T, T + (cache.length if cache is not None else 0), positions, mask)
        if plan is None:
            return super().forward(x, position=position, positions=positions, mask=mask, cache=cache, context=context)

        q, k, v = self._project(x, position, positions, cache)  # (B, H, T, hd), (B, Hkv, S, hd) x 2
        S = k.shape[2]
        if self.n_kv_heads != self.n_heads:  # the masked CPU kernels refuse enable_gqa: expand once, O(S)
            groups = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(groups, dim=1)  # (B, H, S, hd)
            v = v.repeat_interleave(groups, dim=1)
        offset = S - T  # query t is key t + offset
        k_positions = mask.keys_at(positions, S)
        dropout_p = self.dropout if self.training else 0.0
        outs = []
        for start, end, ranges in plan:
            k_idx = torch.cat([torch.arange(lo, hi, device=x.device) for lo, hi in ranges])  # (n,) this chunk's keys
            q_idx = torch.arange(start, end, device=x.device) + offset  # (c,) the queries' own key indices
            q_pos, k_pos = positions[:, start:end], k_positions[:, k_idx]  # (B or 1, c), (B or 1, n)
            allowed = self._chunk_allowed(mask, q_pos, k_pos, q_idx, k_idx)  # (B or 1, 1, c, n)
            attn_mask, _, has_key = guarded_sdpa_mask(allowed, position.bias(q_pos, k_pos), q.dtype)
            k_c, v_c = _gather(k, ranges), _gather(v, ranges)  # (B, H, n, hd) each
            y = F.scaled_dot_product_attention(
                q[:, :, start:end], k_c, v_c, attn_mask=attn_mask, dropout_p=dropout_p
            )  # (B, H, c, hd)
            if has_key is not None:
                y = y.masked_fill(~has_key, 0.0)  # queries that may see no key output zeros, not NaN
            outs.append(y)
        y = torch.cat(outs, dim=2).transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H * hd)
        return self.o_proj(y)

    def band_plan(self, T: int, S: int, positions: Tensor, mask: AttentionMask) -> BandPlan | None:
        """The chunks of the banded path for self-attention, or None where the full-mask path runs.

        Args:
            T: new query positions.
            S: keys, the cached ones included (the last T keys are the queries' own tokens).
            positions: (B or 1, T) absolute positions of the queries.
            mask: the model's mask.

        Returns:
            ``[(start, end, ((lo, hi), ...)), ...]``: queries ``start:end`` attend to the keys with indices
            in the union of the ranges ``lo:hi`` (disjoint, ascending), or None (see the class docstring).
        """
        if T < 1 or torch.compiler.is_compiling():
            return None
        offset, reach = S - T, self.reach
        back = reach if mask.window is None else min(reach, mask.window - 1)
        ahead = reach if not mask.causal or mask.prefix_lengths is not None else 0
        chunk = min(T, self.chunk_size or max(MIN_BAND_CHUNK, reach + 1))
        n_global_q = n_global_k = 0
        if self.global_tokens:  # positions step by 1 (checked below), so the global ones come first
            first = positions[:, :1]  # (B or 1, 1)
            n_global_q = int((self.global_tokens - first).clamp(0, T).max())
            n_global_k = int((self.global_tokens - first + offset).clamp(0, S).max())
        if chunk + back + ahead + n_global_k >= S or not self._bandable(positions, mask, T, S):
            return None
        plan: BandPlan = []
        if n_global_q:  # global queries see every key (that the model's mask allows)
            plan.append((0, n_global_q, ((0, S if ahead else n_global_q + offset),)))
        for start in range(n_global_q, T, chunk):
            end = min(start + chunk, T)
            lo, hi = max(0, start + offset - back), min(S, end + offset + ahead)
            if n_global_k == 0 or lo > n_global_k:
                ranges = ((lo, hi),) if n_global_k == 0 else ((0, n_global_k), (lo, hi))
            else:
                ranges = ((0, hi),)  # the band touches the global keys: one contiguous range
            plan.append((start, end, ranges))
        return plan

    def _bandable(self, positions: Tensor, mask: AttentionMask, T: int, S: int) -> bool:
        """Whether index distance bounds position distance, so the band holds every allowed pair."""
        if mask.key_positions is not None:  # keys placed by the caller, not by index
            return False
        steps = positions[:, 1:] - positions[:, :-1]  # (B or 1, T - 1)
        if bool((steps == 1).all()):
            return True
        if self.global_tokens or mask.document_ids is None or T != S:
            return False
        docs = mask.document_ids.to(positions.device)
        doc_steps = docs[:, 1:] - docs[:, :-1]  # (B, T - 1)
        return bool((doc_steps >= 0).all()) and bool(((steps == 1) | (doc_steps != 0)).all())

    def _chunk_allowed(self, mask: AttentionMask, q_pos: Tensor, k_pos: Tensor, q_idx: Tensor, k_idx: Tensor) -> Tensor:
        """The local pattern AND the model's mask for one chunk: (B or 1, 1, c, n) bool.

        Args:
            q_pos, k_pos: (B or 1, c), (B or 1, n) absolute positions of the chunk's queries and keys.
            q_idx, k_idx: (c,), (n,) their key indices, which index ``padding`` and ``document_ids``.
        """
        i, j = q_pos[:, :, None], k_pos[:, None, :]  # (B or 1, c, 1), (B or 1, 1, n)
        docs = None if mask.document_ids is None else mask.document_ids.to(q_pos.device)
        prefix = None if mask.prefix_lengths is None else mask.prefix_lengths.to(q_pos.device)[:, None, None]
        allowed = _and_model_mask(
            self.local(i, j),
            i,
            j,
            causal=mask.causal,
            window=mask.window,
            prefix=prefix,
            doc_i=None if docs is None else docs[:, q_idx, None],  # (B, c, 1)
            doc_j=None if docs is None else docs[:, None, k_idx],  # (B, 1, n)
            real_j=None if mask.padding is None else mask.padding.to(q_pos.device, torch.bool)[:, None, k_idx],
        )
        return allowed[:, None]  # (B or 1, 1, c, n)

    def _project(
        self, x: Tensor, position: Position, positions: Tensor, cache: KVCache | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, dim) -> rotated q (B, H, T, hd) and every key/value so far (B, Hkv, S, hd); fills the cache."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        if self.q_norm is not None:
            q = self.q_norm(q)
        k, v = self._keys_values(x)  # (B, Hkv, T, hd) each
        q, k = position.rotate(q, k, positions)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hkv, S, hd): past and new
        return q, k, v

    def _flex_forward(
        self, x: Tensor, position: Position, positions: Tensor, mask: AttentionMask, cache: KVCache | None
    ) -> Tensor:
        """FlexAttention over the new tokens (an empty cache: S == T). x: (B, T, dim) -> (B, T, dim)."""
        from torch.nn.attention.flex_attention import create_block_mask

        B, T, _ = x.shape
        q, k, v = self._project(x, position, positions, cache)
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
            return _and_model_mask(
                self.local(i, j),
                i,
                j,
                causal=causal,
                window=window,
                prefix=None if prefix is None else prefix[b],
                doc_i=None if docs is None else docs[b, q_idx],
                doc_j=None if docs is None else docs[b, kv_idx],
                real_j=None if padding is None else padding[b, kv_idx],
            )

        return mask_mod

    def _attention_mask(
        self, q: Tensor, k: Tensor, position: Position, positions: Tensor, mask: AttentionMask, cross: bool
    ) -> tuple[Tensor | None, bool, Tensor | None]:
        """SDPA arguments as in :class:`MultiHeadAttention`, with the local pattern folded into the mask."""
        if cross:
            return super()._attention_mask(q, k, position, positions, mask, cross)
        S = k.shape[2]
        k_positions = mask.keys_at(positions, S)  # (B or 1, S)
        allowed = self.local(positions[:, :, None], k_positions[:, None, :])[:, None]  # (B or 1, 1, T, S)
        model_allowed = mask.allowed(positions, k_positions)  # (B or 1, 1, T or 1, S) or None
        if model_allowed is not None:
            allowed = allowed & model_allowed
        return guarded_sdpa_mask(allowed, position.bias(positions, k_positions), q.dtype)


def _gather(x: Tensor, ranges: tuple[tuple[int, int], ...]) -> Tensor:
    """The positions ``lo:hi`` of every range of x (..., S, hd): a view for one range, a copy otherwise."""
    if len(ranges) == 1:
        return x[..., ranges[0][0] : ranges[0][1], :]
    return torch.cat([x[..., lo:hi, :] for lo, hi in ranges], dim=-2)


def _and_model_mask(
    ok: Tensor,
    i: Tensor,
    j: Tensor,
    *,
    causal: bool,
    window: int | None,
    prefix: Tensor | None,
    doc_i: Tensor | None,
    doc_j: Tensor | None,
    real_j: Tensor | None,
) -> Tensor:
    """``ok`` AND the model's mask, elementwise: the twin of ``AttentionMask.allowed`` for given pairs.

    ``i``, ``j`` are query and key positions, ``prefix`` the prefix length of the row, ``doc_i``, ``doc_j``
    the documents and ``real_j`` the padding flag of the key; all broadcast together.
    """
    if causal:
        seen = j <= i
        if prefix is not None:
            seen = seen | ((i < prefix) & (j < prefix))
        ok = ok & seen
    if window is not None:
        ok = ok & (i - j < window)
    if doc_i is not None:
        ok = ok & (doc_i == doc_j)
    if real_j is not None:
        ok = ok & real_j
    return ok


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_attention():
    """FlexAttention, compiled unless an enclosing ``torch.compile`` already traces it."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention()


def _check_pattern(window: int, global_tokens: int, block_size: int | None, chunk_size: int | None) -> None:
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
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(
            f"SlidingWindowAttention chunk_size={chunk_size!r} must be None (automatic) or an integer >= 1: the "
            "query positions per chunk of the banded attention path."
        )
