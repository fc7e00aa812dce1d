"""Linear attention: kernel feature maps instead of softmax, with a constant-size decoding state."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightningllm.contracts import Attention, Position
from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask
from lightningllm.registry import register

FEATURE_MAPS = ("elu", "relu", "exp", "exp_head_dim")


class LinearAttentionState(nn.Module):
    """The running sums of one linear-attention layer: what decoding keeps instead of keys and values.

    ``S = sum_s phi(k_s) v_s^T`` (B, Hkv, hd, hd) and ``z = sum_s phi(k_s)`` (B, Hkv, hd), summed over
    every position seen so far: memory is constant in the number of decoded tokens. The sums are held
    in at least float32 whatever ``dtype`` asks for, since they accumulate over the whole sequence.

    Args:
        batch_size: B.
        n_kv_heads: key/value heads (query heads of a group share their key/value head's state).
        head_dim: per-head width.
        max_len: the most positions a caller means to decode (kept for callers that read it; the state
            itself has no such limit).
        dtype: requested dtype; the sums use ``promote_types(dtype, float32)``.
        device: where the sums live.
    """

    S: Tensor
    z: Tensor

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        dtype = torch.promote_types(dtype, torch.float32)
        S = torch.zeros(batch_size, n_kv_heads, head_dim, head_dim, dtype=dtype, device=device)
        self.register_buffer("S", S, persistent=False)
        self.register_buffer("z", torch.zeros(batch_size, n_kv_heads, head_dim, dtype=dtype, device=device),
                             persistent=False)  # fmt: skip
        self.length = 0
        self.max_len = max_len

    def update(self, phi_k: Tensor, v: Tensor) -> None:
        """Add T new positions to the sums.

        Args:
            phi_k: (B, Hkv, T, hd) key features (zero at padded keys).
            v: (B, Hkv, T, hd) values.
        """
        phi_k, v = phi_k.to(self.S.dtype), v.to(self.S.dtype)
        # new tensors rather than in-place adds, so a graph that read the old sums stays valid
        self.S = self.S + torch.einsum("bhte,bhtd->bhed", phi_k, v)  # (B, Hkv, hd, hd)
        self.z = self.z + phi_k.sum(dim=2)  # (B, Hkv, hd)
        self.length += phi_k.shape[2]

    def reset(self) -> None:
        """Forget every position: zero sums, length 0."""
        self.S = torch.zeros_like(self.S)
        self.z = torch.zeros_like(self.z)
        self.length = 0


@register("attention")
class LinearAttention(Attention):
    """Softmax replaced by a positive feature map, so attention costs O(T) time and memory.

    "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention"
    (Katharopoulos et al., 2020). With a feature map ``phi`` applied to every query and key
    (per head, over its hd channels), position ``t`` reads

        y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps),   S_t = sum_s phi(k_s) v_s^T,   z_t = sum_s phi(k_s)

    where the sums run over every unpadded key (bidirectional) or over ``s <= t`` (causal).
    Memory is linear in sequence length: nothing of size (T, T) is ever built.

    - Bidirectional (``mask.causal`` False, encoders): S and z are summed once over all keys.
    - Causal: chunk-wise. The sequence is cut into chunks of ``chunk_size``; inside a chunk the
      masked quadratic form ``tril(phi(Q) phi(K)^T) V`` is used, across chunks the state S, z of
      all earlier chunks (an exclusive cumulative sum, no Python loop) is added. Cost
      O(T * chunk_size * hd + T * hd^2); memory O(T * (chunk_size + hd)).
    - Decoding: :meth:`make_cache` gives a :class:`LinearAttentionState`; each step starts from
      its S, z and adds the new positions: the recurrent form of the paper, for one or many tokens.

    Feature maps (``phi``), all positive so the denominator is positive:

    - ``elu``: ``elu(x) + 1``, the paper's choice.
    - ``relu``: ``relu(x)`` (a query with no positive overlap gets the output 0, held finite by ``eps``).
    - ``exp``: ``exp(x - max_i x_i)``, the max taken over the token's own hd channels. Every entry lies
      in (0, 1] and the largest is exactly 1, so it can neither overflow nor give an all-zero feature
      (exp of large scores would overflow float32 beyond x ~ 88). The shift depends on the token alone,
      so it is one fixed function of x: causal, chunked and recurrent forms stay identical. For queries
      the shift cancels between numerator and denominator; for keys it is part of the map.
    - ``exp_head_dim``: ``exp(x / hd)``, the form of the seed notes: no per-token shift, so a key's
      weight depends on its own scale (unlike ``exp``, whose attention weights differ). Large inputs can
      overflow; ``qk_norm`` keeps them bounded.

    The feature products are computed in float32 (float64 stays float64) and cast back to x's dtype.

    Positions: RoPE-style ``position.rotate`` is applied to q and k *before* the feature map (so the
    score no longer depends on the relative offset alone, as it does under softmax; this is the
    simple, commonly used choice). An additive score bias (``position.bias``, e.g. ALiBi) cannot be
    expressed, since the scores are never formed; it is refused with ConfigError when the model is
    built (:meth:`check_compatible`) and again in ``forward``. The mask's ``window``, ``document_ids``
    and ``prefix_lengths`` are refused with ConfigError too (not supported yet).

    QK-norm (Dehghani et al., 2023, "Scaling Vision Transformers to 22 Billion Parameters"; OLMo 2,
    Qwen 3): with ``qk_norm`` queries and keys are RMS-normalised per head (learnable scale each,
    eps 1e-6) right after their projections, before the rotation and the feature map, as in
    :class:`~lightningllm_plugins.attention.multi_head.MultiHeadAttention`. It bounds the feature
    map's inputs, which matters most for ``exp``.

    Grouped-query attention: query head ``h`` reads key/value head ``h // (n_heads // n_kv_heads)``; the
    sums are kept once per key/value head and shared by its query group (same result as expanding
    the key/value heads, n_heads / n_kv_heads times less state).

    Notation: B batch, T query positions, S key positions, H = n_heads, Hkv = n_kv_heads,
    G = H // Hkv, hd = head_dim = dim // n_heads, N chunks of C = chunk_size positions.

    Args:
        dim: model width.
        n_heads: query heads.
        n_kv_heads: key/value heads (None: n_heads); must divide n_heads.
        dropout: dropout on the per-head attention output while training (there is no matrix of
            attention probabilities to drop from).
        feature_map: ``elu`` (elu + 1), ``relu``, ``exp`` (exp(x - max x)) or ``exp_head_dim`` (exp(x / hd));
            see above.
        bias: give the four projections a bias.
        chunk_size: positions per chunk of the causal form; trades the quadratic in-chunk work
            against the number of (hd, hd) chunk states.
        eps: added to the denominator ``phi(q)^T z``.
        qk_norm: RMS-normalise queries and keys per head (learnable scale each) before the feature map.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        dropout: float = 0.0,
        feature_map: Literal["elu", "relu", "exp", "exp_head_dim"] = "elu",
        bias: bool = False,
        chunk_size: int = 64,
        eps: float = 1e-6,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        _check(dim, n_heads, n_kv_heads, dropout, feature_map, chunk_size, eps)
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.dropout, self.feature_map, self.chunk_size, self.eps = dropout, feature_map, chunk_size, eps
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

    def forward(
        self,
        x: Tensor,
        *,
        position: Position,
        positions: Tensor,
        mask: AttentionMask,
        cache: LinearAttentionState | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim).

        Args:
            position: the model's positional plugin; ``rotate`` applies to self-attention, ``bias`` is refused.
            positions: (B or 1, T) absolute positions of ``x``.
            mask: ``causal`` and ``padding`` ((B, S) True at real keys; S counts the keys already in
                ``cache`` too) are honoured. For cross-attention only ``padding`` over the context is used.
            cache: this layer's :class:`LinearAttentionState`. Causal self-attention starts from its sums
                and adds the new positions; cross-attention fills it from the context on the first call
                and reuses it afterwards.
            context: (B, S, dim) encoder output for cross-attention.
        """
        _check_mask(mask)
        B, T, _ = x.shape
        compute = torch.promote_types(x.dtype, torch.float32)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if context is None:
            _check_position(position, positions)
            if not mask.causal and cache is not None:
                raise ConfigError(
                    "LinearAttention got a decoding cache with a bidirectional (causal=False) mask: every "
                    "query would need keys that come later. Decode with causal=True, or run without a cache."
                )
            k, v = self._keys_values(x)  # (B, Hkv, T, hd) each
            q, k = position.rotate(q, k, positions)
        elif cache is not None and cache.length > 0:
            k = v = None  # the context's sums are already in the cache
        else:
            k, v = self._keys_values(context)  # (B, Hkv, S, hd)

        G = self.n_heads // self.n_kv_heads
        phi_q = self._phi(q.to(compute)).view(B, self.n_kv_heads, G, T, self.head_dim)  # (B, Hkv, G, T, hd)
        if k is not None:
            phi_k, v = self._phi(k.to(compute)), v.to(compute)  # (B, Hkv, S, hd)
            if mask.padding is not None:
                real = mask.padding.to(device=x.device, dtype=torch.bool)[:, -phi_k.shape[2] :]  # (B, S)
                phi_k = phi_k * real[:, None, :, None]  # padded keys contribute nothing

        if context is not None:
            if k is not None and cache is not None:
                cache.update(phi_k, v)
            if k is None:
                kv, k_sum = cache.S.to(compute), cache.z.to(compute)
            else:
                kv, k_sum = torch.einsum("bhse,bhsd->bhed", phi_k, v), phi_k.sum(dim=2)
            y = self._read(phi_q, kv, k_sum)
        elif mask.causal:
            start = (cache.S.to(compute), cache.z.to(compute)) if cache is not None and cache.length > 0 else None
            y = self._causal(phi_q, phi_k, v, start)
            if cache is not None:
                cache.update(phi_k, v)
        else:
            y = self._read(phi_q, torch.einsum("bhse,bhsd->bhed", phi_k, v), phi_k.sum(dim=2))

        y = y.reshape(B, self.n_heads, T, self.head_dim).to(x.dtype)  # (B, H, T, hd)
        y = F.dropout(y, self.dropout, self.training)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H * hd)
        return self.o_proj(y)

    def check_compatible(self, position: Position) -> None:
        """Refuse a position plugin with a score bias (ALiBi): linear attention never forms the scores.

        Args:
            position: the model's positional plugin; probed with one position on its own device.
        """
        tensor = next(iter(position.buffers()), next(iter(position.parameters()), None))
        device = tensor.device if tensor is not None else None
        _check_position(position, torch.zeros(1, 1, dtype=torch.long, device=device))

    def _keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, S, dim) -> keys, values (B, Hkv, S, hd)."""
        B, S, _ = x.shape
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v

    def _phi(self, x: Tensor) -> Tensor:
        """The positive feature map, elementwise over (..., hd) -> (..., hd)."""
        if self.feature_map == "elu":
            return F.elu(x) + 1.0
        if self.feature_map == "relu":
            return F.relu(x)
        if self.feature_map == "exp_head_dim":
            return torch.exp(x / x.shape[-1])
        return torch.exp(x - x.amax(dim=-1, keepdim=True))  # entries in (0, 1], the largest exactly 1

    def _read(self, phi_q: Tensor, kv: Tensor, k_sum: Tensor) -> Tensor:
        """Every query reads the same sums. phi_q (B, Hkv, G, T, hd), kv (B, Hkv, hd, hd), k_sum (B, Hkv, hd)."""
        num = torch.einsum("bhgte,bhed->bhgtd", phi_q, kv)  # (B, Hkv, G, T, hd)
        den = torch.einsum("bhgte,bhe->bhgt", phi_q, k_sum)  # (B, Hkv, G, T)
        return num / (den[..., None] + self.eps)

    def _causal(self, phi_q: Tensor, phi_k: Tensor, v: Tensor, start: tuple[Tensor, Tensor] | None) -> Tensor:
        """Chunked causal linear attention.

        phi_q (B, Hkv, G, T, hd), phi_k and v (B, Hkv, T, hd), start: sums (B, Hkv, hd, hd), (B, Hkv, hd)
        of earlier positions (a cache) or None -> (B, Hkv, G, T, hd).
        """
        B, Hkv, G, T, hd = phi_q.shape
        C = min(self.chunk_size, T)
        N = -(-T // C)  # chunks, the last one zero-padded: zero features add nothing and are cut off
        pad = N * C - T
        phi_q = F.pad(phi_q, (0, 0, 0, pad)).view(B, Hkv, G, N, C, hd)  # (B, Hkv, G, N, C, hd)
        phi_k = F.pad(phi_k, (0, 0, 0, pad)).view(B, Hkv, N, C, hd)  # (B, Hkv, N, C, hd)
        v = F.pad(v, (0, 0, 0, pad)).view(B, Hkv, N, C, hd)  # (B, Hkv, N, C, hd)

        # across chunks: the sums of every earlier chunk (exclusive cumulative sum), plus the cache's
        kv = torch.einsum("bhnce,bhncd->bhned", phi_k, v)  # (B, Hkv, N, hd, hd) per-chunk sums
        kv_before = F.pad(kv, (0, 0, 0, 0, 1, 0))[:, :, :-1].cumsum(dim=2)  # (B, Hkv, N, hd, hd)
        k_before = F.pad(phi_k.sum(dim=3), (0, 0, 1, 0))[:, :, :-1].cumsum(dim=2)  # (B, Hkv, N, hd)
        if start is not None:
            kv_before = kv_before + start[0][:, :, None]
            k_before = k_before + start[1][:, :, None]
        num = torch.einsum("bhgnce,bhned->bhgncd", phi_q, kv_before)  # (B, Hkv, G, N, C, hd)
        den = torch.einsum("bhgnce,bhne->bhgnc", phi_q, k_before)  # (B, Hkv, G, N, C)

        # within a chunk: the masked quadratic form
        scores = torch.einsum("bhgnce,bhnse->bhgncs", phi_q, phi_k)  # (B, Hkv, G, N, C, C)
        scores = scores * torch.ones(C, C, dtype=torch.bool, device=scores.device).tril()
        num = num + torch.einsum("bhgncs,bhnsd->bhgncd", scores, v)
        den = den + scores.sum(dim=-1)

        y = num / (den[..., None] + self.eps)  # (B, Hkv, G, N, C, hd)
        return y.reshape(B, Hkv, G, N * C, hd)[:, :, :, :T]  # (B, Hkv, G, T, hd)

    def make_cache(self, batch_size: int, max_len: int, **tensor_kwargs) -> LinearAttentionState:
        """Empty running sums (constant size, whatever ``max_len``).

        Args:
            batch_size: B.
            max_len: the most positions the caller means to decode (recorded, not a limit).
            tensor_kwargs: ``dtype`` and ``device`` of the state (the sums use at least float32).
        """
        return LinearAttentionState(batch_size, self.n_kv_heads, self.head_dim, max_len, **tensor_kwargs)


def _check_position(position: Position, positions: Tensor) -> None:
    """Refuse a positional plugin that biases scores: linear attention never forms them."""
    first = positions[:, :1]
    if position.bias(first, first) is not None:  # a (B, H, 1, 1) probe, not a (T, T) bias
        raise ConfigError(
            f"LinearAttention cannot use the position plugin {type(position).__name__}: it adds a bias to each "
            f"query-key score, and linear attention never forms the scores (it sums phi(k) v^T over keys "
            f"instead), so the bias cannot be applied. Use a position that rotates queries and keys (RoPE) or "
            f"embeds positions (LearnedPosition, Sinusoidal), or NoPosition."
        )


def _check_mask(mask: AttentionMask) -> None:
    for field in ("window", "document_ids", "prefix_lengths"):
        if getattr(mask, field) is not None:
            raise ConfigError(
                f"LinearAttention does not support the attention mask's {field} (got {field}="
                f"{getattr(mask, field)!r:.60}) yet: it honours causal and padding only. Leave {field} unset "
                f"or use MultiHeadAttention."
            )


def _check(
    dim: int, n_heads: int, n_kv_heads: int, dropout: float, feature_map: str, chunk_size: int, eps: float
) -> None:
    if n_heads < 1 or n_kv_heads < 1 or dim % n_heads:
        raise ConfigError(
            f"LinearAttention needs dim={dim} to split evenly into n_heads={n_heads} heads of at least one "
            f"channel (and n_kv_heads={n_kv_heads} >= 1). Choose n_heads among the divisors of {dim}."
        )
    if n_heads % n_kv_heads:
        raise ConfigError(
            f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}: each key/value head serves an equal "
            f"group of query heads. Choose n_kv_heads among the divisors of {n_heads} (1 = MQA, {n_heads} = MHA)."
        )
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"Attention dropout={dropout} must be in [0, 1).")
    if feature_map not in FEATURE_MAPS:
        raise ConfigError(f"LinearAttention feature_map={feature_map!r} is unknown; choose one of {FEATURE_MAPS}.")
    if chunk_size < 1:
        raise ConfigError(f"LinearAttention chunk_size={chunk_size} must be a positive number of positions.")
    if not eps > 0:
        raise ConfigError(f"LinearAttention eps={eps} must be positive: it keeps the denominator away from zero.")
