"""Multi-head latent attention (MLA): keys and values compressed into a small cached latent, as in DeepSeek-V2."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightningllm.contracts import Attention, Position
from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask
from lightningllm.registry import register
from lightningllm_plugins.attention.multi_head import self_attention_sdpa_mask
from lightningllm_plugins.position.rope import RoPE, rotate_half

ABSORB = ("decode", "always", "never")


class LatentCache(nn.Module):
    """What one MLA layer keeps while decoding: the key/value latent and the shared rotated rope key.

    Per token that is ``kv_lora_rank + rope_head_dim`` numbers, whatever the number of heads (a
    :class:`~lightningllm.cache.KVCache` of multi-head attention keeps ``2 * n_heads * head_dim``).
    Static shapes (``max_len`` slots, filled left to right) as in ``KVCache``.

    Args:
        batch_size: B.
        max_len: the most positions the cache holds.
        kv_lora_rank: width r of the latent ``c_kv``.
        rope_head_dim: width of the shared rope key (0: none).
        dtype: dtype of the cached tensors.
        device: where they live.
    """

    c_kv: Tensor
    k_rope: Tensor

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        kv_lora_rank: int,
        rope_head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        c_kv = torch.zeros(batch_size, max_len, kv_lora_rank, dtype=dtype, device=device)  # (B, L, r)
        k_rope = torch.zeros(batch_size, max_len, rope_head_dim, dtype=dtype, device=device)  # (B, L, rope)
        self.register_buffer("c_kv", c_kv, persistent=False)
        self.register_buffer("k_rope", k_rope, persistent=False)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.c_kv.shape[1]

    def update(self, c_kv: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        """Append T new positions and return everything cached so far.

        Args:
            c_kv: (B, T, kv_lora_rank) normalised latents of the new positions.
            k_rope: (B, T, rope_head_dim) their rotated rope keys.

        Returns:
            c_kv (B, S, kv_lora_rank) and k_rope (B, S, rope_head_dim), S = length + T.
        """
        start, end = self.length, self.length + c_kv.shape[1]
        if end > self.max_len:
            raise ValueError(f"Latent cache holds {self.max_len} positions; cannot append up to position {end}.")
        self.c_kv[:, start:end] = c_kv
        self.k_rope[:, start:end] = k_rope
        self.length = end
        return self.c_kv[:, :end], self.k_rope[:, :end]

    def reset(self) -> None:
        """Forget every position (the buffers are overwritten on the next update)."""
        self.length = 0


@register("attention")
class MultiHeadLatentAttention(Attention):
    """Multi-head attention whose keys and values are up-projected from one low-rank latent per token.

    "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model"
    (DeepSeek-AI, 2024, arXiv 2405.04434), section 2.1. For a token ``x_s`` (eqs. 9-19)::

        c_kv_s   = RMSNorm(W_DKV x_s)                      (r = kv_lora_rank)       kv_down_proj, kv_latent_norm
        k_s,h    = [W_UK_h c_kv_s ; RoPE(W_KR x_s, s)]     (nope | rope channels)   k_up_proj, k_rope_proj
        v_s,h    = W_UV_h c_kv_s                           (v_head_dim)             v_up_proj
        c_q_t    = RMSNorm(W_DQ x_t)                       (q_lora_rank, optional)  q_down_proj, q_latent_norm
        q_t,h    = [W_UQ_h c_q_t ; RoPE(W_QR_h c_q_t, t)]  (nope | rope channels)   q_proj
        o_t,h    = sum_s softmax_s(q_t,h . k_s,h / sqrt(nope_head_dim + rope_head_dim)) v_s,h
        u_t      = W_O [o_t,1 ; ... ; o_t,H]                                        o_proj

    The rope key ``RoPE(W_KR x_s, s)`` is ONE vector per token shared by every head ("decoupled
    RoPE"): position lives in those few channels only, so the nope part of the key stays a linear
    function of the latent. Only ``c_kv`` and the rotated rope key are cached
    (:class:`LatentCache`): ``kv_lora_rank + rope_head_dim`` numbers per token and layer, against
    ``2 * n_heads * head_dim`` for multi-head attention (DeepSeek-V2: 512 + 64 = 576 vs 32768).

    Decoding from the cache (``absorb``): the plain form up-projects every cached latent to
    per-head keys and values at each step. The absorbed form (section 2.1.2) folds ``W_UK_h`` into
    the query (``q_nope . W_UK_h c = (W_UK_h^T q_nope) . c``) and ``W_UV_h`` into the output
    (``sum p W_UV_h c = W_UV_h sum p c``): attention runs over the latents themselves, one
    (r + rope)-wide key per token shared by all heads, and per-head keys are never built. Both give
    the same result; the absorbed form is cheaper when few queries read many cached tokens, the
    plain one when T is large (prefill, training). Absorption reads ``k_up_proj.weight`` and
    ``v_up_proj.weight``, so when an adapter has replaced either module by something other than a
    plain ``nn.Linear``, the plain form is used.

    Positions. Only the decoupled rope channels carry a rotation, of width ``rope_head_dim``:

    - with the model's position plugin :class:`~lightningllm_plugins.position.rope.RoPE`, they use
      that plugin's base and scaling (``linear`` divides positions by ``factor``; ``ntk`` enlarges
      the base for width ``rope_head_dim``), and ``rope_base`` is ignored. The plugin's own
      ``rotate`` (sized for ``dim // n_heads``) is never called.
    - with embed-only plugins (NoPosition, LearnedPosition, Sinusoidal) they use ``rope_base``;
      set ``rope_head_dim: 0`` for no rotation at all.
    - a score bias (ALiBi) is added to the scores of every head as in multi-head attention.
    - any other plugin that rotates queries and keys is refused (:meth:`check_compatible`): its
      rotation is defined for whole heads, not for a decoupled sub-dimension.

    Grouped heads (``n_kv_heads < n_heads``, a generalisation beyond the paper, which has
    ``n_kv_heads == n_heads``): ``W_UK`` and ``W_UV`` produce ``n_kv_heads`` key/value heads and
    query head ``h`` reads head ``h // (n_heads // n_kv_heads)``, as in grouped-query attention.
    The cache is the latent either way; grouping saves up-projection parameters and compute.

    No QK-norm option: a norm of the up-projected keys would be nonlinear in the latent and forbid
    absorption; the latent RMSNorms (``latent_norm``) are DeepSeek-V2's own stabiliser.
    Self-attention only: ``context`` (cross-attention) is refused, since a decoupled rope key has
    no meaning between two sequences; use MultiHeadAttention for cross-attention.

    Masks are honoured as in MultiHeadAttention: SDPA's causal fast path, padding, prefix, window
    and document ids; queries that may see no key output zeros.

    Notation: B batch, T query positions, S key positions (cached and new), H = n_heads,
    Hkv = n_kv_heads, G = H // Hkv, r = kv_lora_rank, nope/rope/v = nope_head_dim/rope_head_dim/v_head_dim,
    hd = dim // n_heads.

    Args:
        dim: model width.
        n_heads: query heads.
        n_kv_heads: heads of up-projected keys/values (None: n_heads, as in DeepSeek-V2); must divide n_heads.
        dropout: dropout on the attention probabilities while training.
        kv_lora_rank: width r of the cached key/value latent (None: 4 * hd, the paper's d_c = 4 d_h).
        q_lora_rank: width of the query latent (None: queries are projected from x directly, as in
            DeepSeek-V2-Lite; DeepSeek-V2 uses 1536).
        rope_head_dim: decoupled rope channels per head, even; 0 turns the rotation off (None: hd / 2
            rounded down to even, the paper's d_h^R = d_h / 2).
        nope_head_dim: per-head query/key channels without position (None: hd).
        v_head_dim: per-head value channels (None: hd).
        rope_base: wavelength base of the decoupled rope when the model's position plugin is not RoPE.
        latent_norm: RMSNorm (learnable scale, eps 1e-6) on c_kv and on c_q, as DeepSeek-V2; False
            leaves the plain low-rank factorisation.
        absorb: ``decode``: the absorbed form when new tokens read a non-empty cache, the plain form
            otherwise; ``always`` / ``never``: one form everywhere.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        dropout: float = 0.0,
        kv_lora_rank: int | None = None,
        q_lora_rank: int | None = None,
        rope_head_dim: int | None = None,
        nope_head_dim: int | None = None,
        v_head_dim: int | None = None,
        rope_base: float = 10000.0,
        latent_norm: bool = True,
        absorb: Literal["decode", "always", "never"] = "decode",
    ) -> None:
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        _check_structure(dim, n_heads, n_kv_heads, dropout)
        hd = dim // n_heads
        kv_lora_rank = 4 * hd if kv_lora_rank is None else kv_lora_rank
        rope_head_dim = hd // 2 // 2 * 2 if rope_head_dim is None else rope_head_dim
        nope_head_dim = hd if nope_head_dim is None else nope_head_dim
        v_head_dim = hd if v_head_dim is None else v_head_dim
        _check_knobs(kv_lora_rank, q_lora_rank, rope_head_dim, nope_head_dim, v_head_dim, rope_base, absorb)
        self.n_heads, self.n_kv_heads, self.dropout, self.absorb = n_heads, n_kv_heads, dropout, absorb
        self.kv_lora_rank, self.q_lora_rank = kv_lora_rank, q_lora_rank
        self.rope_head_dim, self.nope_head_dim, self.v_head_dim = rope_head_dim, nope_head_dim, v_head_dim
        self.rope_base = rope_base
        self.scale = 1.0 / math.sqrt(nope_head_dim + rope_head_dim)
        qk_head_dim = nope_head_dim + rope_head_dim

        if q_lora_rank is None:
            self.q_down_proj = self.q_latent_norm = None
            self.q_proj = nn.Linear(dim, n_heads * qk_head_dim, bias=False)  # [W_UQ; W_QR] on x
        else:
            self.q_down_proj = nn.Linear(dim, q_lora_rank, bias=False)  # W_DQ
            self.q_latent_norm = nn.RMSNorm(q_lora_rank, eps=1e-6) if latent_norm else None
            self.q_proj = nn.Linear(q_lora_rank, n_heads * qk_head_dim, bias=False)  # [W_UQ; W_QR] on c_q
        self.kv_down_proj = nn.Linear(dim, kv_lora_rank, bias=False)  # W_DKV
        self.kv_latent_norm = nn.RMSNorm(kv_lora_rank, eps=1e-6) if latent_norm else None
        self.k_rope_proj = nn.Linear(dim, rope_head_dim, bias=False) if rope_head_dim else None  # W_KR
        self.k_up_proj = nn.Linear(kv_lora_rank, n_kv_heads * nope_head_dim, bias=False)  # W_UK
        self.v_up_proj = nn.Linear(kv_lora_rank, n_kv_heads * v_head_dim, bias=False)  # W_UV
        self.o_proj = nn.Linear(n_heads * v_head_dim, dim, bias=False)  # W_O

    def reset_parameters(self) -> None:
        """Latent-norm scales to one; the projections keep the model's initialisation."""
        for norm in (self.q_latent_norm, self.kv_latent_norm):
            if norm is not None:
                norm.reset_parameters()

    def forward(
        self,
        x: Tensor,
        *,
        position: Position,
        positions: Tensor,
        mask: AttentionMask,
        cache: LatentCache | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim).

        Args:
            position: the model's positional plugin; sets the decoupled rope's base and scaling if it
                is RoPE, and adds its ``bias`` (if any) to the scores.
            positions: (B or 1, T) absolute positions of ``x``.
            mask: which keys each query may see (``padding`` is (B, S), S counting the cached keys).
            cache: this layer's :class:`LatentCache`; the new latents and rope keys are appended.
            context: not supported (self-attention only); passing it raises ConfigError.
        """
        if context is not None:
            raise ConfigError(
                "MultiHeadLatentAttention is self-attention only and got a context for cross-attention: its "
                "decoupled rope key ties every key to a position of the same sequence. Use MultiHeadAttention "
                "for cross-attention (e.g. as the encoder-decoder's cross-attention plugin)."
            )
        self.check_compatible(position)
        B, T, _ = x.shape
        H, nope, rope = self.n_heads, self.nope_head_dim, self.rope_head_dim
        q_in = x
        if self.q_down_proj is not None:
            q_in = self.q_down_proj(x)  # (B, T, q_lora_rank)
            if self.q_latent_norm is not None:
                q_in = self.q_latent_norm(q_in)
        q = self.q_proj(q_in).view(B, T, H, nope + rope).transpose(1, 2)  # (B, H, T, nope + rope)
        q_nope, q_rope = q.split([nope, rope], dim=-1)  # (B, H, T, nope), (B, H, T, rope)
        c_kv = self.kv_down_proj(x)  # (B, T, r)
        if self.kv_latent_norm is not None:
            c_kv = self.kv_latent_norm(c_kv)
        if rope:
            cos, sin = self.decoupled_rope(position).cos_sin(positions)  # (B or 1, 1, T, rope) float32
            q_rope = rotate_half(q_rope, cos, sin)
            k_rope = rotate_half(self.k_rope_proj(x)[:, None], cos, sin)[:, 0]  # (B, T, rope), shared by heads
        else:
            k_rope = x.new_zeros(B, T, 0)
        absorbed = self.absorb == "always" or (self.absorb == "decode" and cache is not None and cache.length > 0)
        absorbed = absorbed and type(self.k_up_proj) is nn.Linear and type(self.v_up_proj) is nn.Linear
        if cache is not None:
            c_kv, k_rope = cache.update(c_kv, k_rope)  # (B, S, r), (B, S, rope): past and new
        attn_mask, is_causal, has_key = self_attention_sdpa_mask(T, c_kv.shape[1], position, positions, mask, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        attend = self._attend_absorbed if absorbed else self._attend_plain
        y = attend(q_nope, q_rope, c_kv, k_rope, attn_mask, is_causal, dropout_p)  # (B, H, T, v)
        if has_key is not None:
            y = y.masked_fill(~has_key, 0.0)  # queries that may see no key output zeros, not NaN
        y = y.transpose(1, 2).reshape(B, T, H * self.v_head_dim)  # (B, T, H * v)
        return self.o_proj(y)

    def _attend_plain(
        self,
        q_nope: Tensor,
        q_rope: Tensor,
        c_kv: Tensor,
        k_rope: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        dropout_p: float,
    ) -> Tensor:
        """Up-project the latents to per-head keys and values, then attend.

        q_nope (B, H, T, nope), q_rope (B, H, T, rope), c_kv (B, S, r), k_rope (B, S, rope) -> (B, H, T, v).
        """
        B, S, _ = c_kv.shape
        H, Hkv = self.n_heads, self.n_kv_heads
        k_nope = self.k_up_proj(c_kv).view(B, S, Hkv, self.nope_head_dim).transpose(1, 2)  # (B, Hkv, S, nope)
        v = self.v_up_proj(c_kv).view(B, S, Hkv, self.v_head_dim).transpose(1, 2)  # (B, Hkv, S, v)
        if Hkv != H:
            k_nope = k_nope.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, nope)
            v = v.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, v)
        k = torch.cat((k_nope, k_rope[:, None].expand(B, H, S, self.rope_head_dim)), dim=-1)  # (B, H, S, nope+rope)
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, H, T, nope + rope)
        return _sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.scale)

    def _attend_absorbed(
        self,
        q_nope: Tensor,
        q_rope: Tensor,
        c_kv: Tensor,
        k_rope: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        dropout_p: float,
    ) -> Tensor:
        """W_UK folded into the queries and W_UV into the output: attention over the latents themselves.

        Arguments and shapes as in :meth:`_attend_plain`; per-head keys and values are never built.
        """
        B, S, r = c_kv.shape
        H, Hkv, T = self.n_heads, self.n_kv_heads, q_nope.shape[2]
        w_uk = self.k_up_proj.weight.view(Hkv, self.nope_head_dim, r)  # (Hkv, nope, r)
        w_uv = self.v_up_proj.weight.view(Hkv, self.v_head_dim, r)  # (Hkv, v, r)
        q_nope = q_nope.reshape(B, Hkv, H // Hkv, T, self.nope_head_dim)  # (B, Hkv, G, T, nope): head h = k*G + g
        q_latent = torch.einsum("bkgtn,knr->bkgtr", q_nope, w_uk).reshape(B, H, T, r)  # W_UK^T q_nope
        q = torch.cat((q_latent, q_rope), dim=-1)  # (B, H, T, r + rope)
        k = torch.cat((c_kv, k_rope), dim=-1)[:, None].expand(B, H, S, r + self.rope_head_dim)  # one key per token
        v = c_kv[:, None].expand(B, H, S, r)  # (B, H, S, r), a view: no copy per head
        o_latent = _sdpa(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.scale
        )  # (B, H, T, r)
        o_latent = o_latent.view(B, Hkv, H // Hkv, T, r)  # (B, Hkv, G, T, r)
        return torch.einsum("bkgtr,kvr->bkgtv", o_latent, w_uv).reshape(B, H, T, self.v_head_dim)  # (B, H, T, v)

    def decoupled_rope(self, position: Position) -> RoPE:
        """The rotation of the ``rope_head_dim`` decoupled channels: the model's RoPE settings, else ``rope_base``."""
        if isinstance(position, RoPE):
            return position.resized(self.rope_head_dim)
        r = self.rope_head_dim
        return RoPE(dim=r, n_heads=1, head_dim=r, max_seq_len=1, base=self.rope_base)

    def check_compatible(self, position: Position) -> None:
        """Refuse positional plugins whose rotation cannot apply to a decoupled rope sub-dimension.

        Args:
            position: the model's positional plugin.
        """
        name = type(position).__name__
        if isinstance(position, RoPE):
            if self.rope_head_dim == 0:
                raise ConfigError(
                    f"MultiHeadLatentAttention has rope_head_dim=0 but the model's position plugin is {name}: "
                    "MLA rotates only its decoupled rope channels, so with none the attention would see no "
                    "position at all. Set rope_head_dim to a positive even number (e.g. half of dim // n_heads), "
                    "or use NoPosition if position-free attention is intended."
                )
            if position.scaling not in ("none", "linear", "ntk"):
                raise ConfigError(
                    f"MultiHeadLatentAttention does not support RoPE scaling={position.scaling!r} on its decoupled "
                    "rope channels yet (its tests cover scaling 'none', 'linear' and 'ntk'). Use one of those, or "
                    "another attention plugin."
                )
            if position.scaling == "ntk" and self.rope_head_dim <= 2:
                raise ConfigError(
                    f"NTK-aware RoPE scaling needs rope_head_dim > 2 (its base grows as factor ** (rope_head_dim "
                    f"/ (rope_head_dim - 2))), got rope_head_dim={self.rope_head_dim}. Use a wider rope_head_dim "
                    "or scaling='linear'."
                )
        elif type(position).rotate is not Position.rotate:
            raise ConfigError(
                f"MultiHeadLatentAttention cannot use the position plugin {name}: it rotates whole query/key "
                "heads, while MLA keeps position in a decoupled rope sub-dimension (one shared rope key per "
                "token) so that the cached latent stays position-free. Use RoPE (its base and scaling then "
                "set the decoupled rotation), an embedding plugin (NoPosition, LearnedPosition, Sinusoidal; "
                "the rotation then uses rope_base) or ALiBi."
            )

    def make_cache(self, batch_size: int, max_len: int, **tensor_kwargs) -> LatentCache:
        """An empty :class:`LatentCache` for ``max_len`` positions.

        Args:
            batch_size: B.
            max_len: the most positions to hold.
            tensor_kwargs: ``dtype`` and ``device`` of the cache.
        """
        return LatentCache(batch_size, max_len, self.kv_lora_rank, self.rope_head_dim, **tensor_kwargs)

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, kv_lora_rank={self.kv_lora_rank}, q_lora_rank={self.q_lora_rank}, "
            f"nope_head_dim={self.nope_head_dim}, rope_head_dim={self.rope_head_dim}, "
            f"v_head_dim={self.v_head_dim}, absorb={self.absorb!r}"
        )


def _check_structure(dim: int, n_heads: int, n_kv_heads: int, dropout: float) -> None:
    if n_heads < 1 or dim < 1 or dim % n_heads:
        raise ConfigError(
            f"MultiHeadLatentAttention needs dim={dim} to split evenly into n_heads={n_heads} heads (the default "
            f"per-head widths are dim // n_heads). Choose n_heads among the divisors of {dim}."
        )
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ConfigError(
            f"MultiHeadLatentAttention got n_kv_heads={n_kv_heads} with n_heads={n_heads}: each head of up-projected "
            f"keys/values serves an equal group of query heads, so n_kv_heads must divide n_heads. Choose it among "
            f"the divisors of {n_heads}, or leave it unset (null) for DeepSeek-V2's one key/value head per query "
            "head (the cache holds the shared latent either way)."
        )
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"Attention dropout={dropout} must be in [0, 1).")


def _check_knobs(
    kv_lora_rank: int,
    q_lora_rank: int | None,
    rope_head_dim: int,
    nope_head_dim: int,
    v_head_dim: int,
    rope_base: float,
    absorb: str,
) -> None:
    widths = {"kv_lora_rank": kv_lora_rank, "nope_head_dim": nope_head_dim, "v_head_dim": v_head_dim}
    if q_lora_rank is not None:
        widths["q_lora_rank"] = q_lora_rank
    for name, value in widths.items():
        if value < 1:
            raise ConfigError(
                f"MultiHeadLatentAttention {name}={value} must be a positive width"
                + (" (or null for no query compression)." if name == "q_lora_rank" else ".")
            )
    if rope_head_dim < 0 or rope_head_dim % 2:
        raise ConfigError(
            f"MultiHeadLatentAttention rope_head_dim={rope_head_dim} must be an even number >= 0: RoPE rotates "
            "pairs of channels (0 turns the decoupled rotation off)."
        )
    if not rope_base > 0:
        raise ConfigError(f"MultiHeadLatentAttention rope_base={rope_base} must be positive (10000 is usual).")
    if absorb not in ABSORB:
        raise ConfigError(f"MultiHeadLatentAttention absorb={absorb!r} is unknown; choose one of {', '.join(ABSORB)}.")


def _sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """SDPA for values narrower than queries: q, k (B, H, T|S, d), v (B, H, S, dv <= d) -> (B, H, T, dv).

    The fused kernels (flash on CPU and GPU) need one head width for q, k and v; otherwise SDPA falls
    back to the math kernel, whose (T, S) scores make memory quadratic. Zero channels padded onto v
    leave the first ``dv`` output channels exactly as they were.
    """
    width, value_width = q.shape[-1], v.shape[-1]
    if value_width >= width:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    padded = F.pad(v, (0, width - value_width))  # (B, H, S, d)
    return F.scaled_dot_product_attention(q, k, padded, **kwargs)[..., :value_width]
