"""What each kind of plugin promises: a base class and the factory the model calls.

Notation: B batch, T query positions, S key positions (T plus what a cache holds),
H query heads, Hkv key/value heads, hd head width, dim model width.

Models receive *factories* and pass the structural sizes as keywords, once per layer;
a config carries only each plugin's own knobs. jsonargparse reads the factory
Protocols below as instance factories, so ``attention: {class_path: MultiHeadAttention,
init_args: {qk_norm: true}}`` becomes ``partial(MultiHeadAttention, qk_norm=True)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from torch import Tensor, nn

from lightningllm.cache import KVCache
from lightningllm.mask import AttentionMask


class Position(nn.Module):
    """Positional encoding: up to three hooks, each a no-op by default.

    ``positions`` are absolute token positions, (B or 1, T) int64.
    """

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        """Add to token embeddings. x: (B, T, dim) -> (B, T, dim)."""
        return x

    def rotate(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate queries and keys of the same new positions.

        q: (B, H, T, hd), k: (B, Hkv, T, hd) -> same shapes.
        """
        return q, k

    def bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor | None:
        """Additive attention-score bias, (B or 1, H, T, S), or None."""
        return None

    def check_length(self, length: int) -> None:
        """Raise :class:`~lightningllm.errors.ConfigError` if ``length`` positions cannot be encoded."""

    @property
    def adds_bias(self) -> bool:
        """Whether this plugin overrides :meth:`bias` (attention that never forms scores cannot honour it)."""
        return type(self).bias is not Position.bias


class PositionFactory(Protocol):
    def __call__(self, *, dim: int, n_heads: int, head_dim: int, max_seq_len: int) -> Position: ...


class Attention(nn.Module):
    """Token mixing. Sub-modules use the shared names ``q_proj k_proj v_proj o_proj``."""

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
            position: the model's positional plugin (``rotate`` and ``bias`` are called here).
            positions: (B or 1, T) absolute positions of ``x``.
            mask: which keys each query may see.
            cache: this layer's cache, updated in place while decoding.
            context: (B, S, dim) encoder output for cross-attention.
        """
        raise NotImplementedError

    def make_cache(self, batch_size: int, max_len: int, **tensor_kwargs) -> KVCache:
        """A cache for decoding ``max_len`` positions."""
        raise NotImplementedError

    def check_compatible(self, position: Position) -> None:
        """Raise :class:`~lightningllm.errors.ConfigError` with the reason if the math forbids ``position``.

        The model calls it once at build time, so an impossible pairing (for example a score bias
        with attention that never forms scores) is refused before any training starts.
        """


class AttentionFactory(Protocol):
    def __call__(self, *, dim: int, n_heads: int, n_kv_heads: int, dropout: float) -> Attention: ...


class FeedForward(nn.Module):
    """Per-token transform. Sub-modules use ``gate_proj up_proj down_proj``.

    A module that produces an auxiliary loss (mixture-of-experts load balancing) stores
    it in ``self.aux_loss`` during ``forward``; tasks add :func:`aux_loss` to their loss.
    """

    aux_loss: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim)."""
        raise NotImplementedError


class FeedForwardFactory(Protocol):
    def __call__(self, *, dim: int, hidden_dim: int, dropout: float) -> FeedForward: ...


class Norm(nn.Module):
    """Normalisation over the last dimension. x: (..., dim) -> (..., dim)."""


class NormFactory(Protocol):
    def __call__(self, *, dim: int) -> Norm: ...


class Block(nn.Module):
    """One layer: how norms, attention, feed-forward and residuals are wired.

    The unit that FSDP wraps and activation checkpointing recomputes. A layout whose
    output is already normalised (post-norm) sets ``final_norm = False`` so the model
    adds no norm after the last block. A layout that uses one norm for both branches may
    set ``norm_2`` to None so no parameter goes unused (DDP requires that).

    Args:
        attention, ffn, norm_1, norm_2: built children.
        dropout: residual dropout on each branch's output.
    """

    final_norm: bool = True

    def __init__(self, attention: Attention, ffn: FeedForward, norm_1: Norm, norm_2: Norm, dropout: float = 0.0):
        super().__init__()
        self.attention = attention
        self.ffn = ffn
        self.norm_1 = norm_1
        self.norm_2 = norm_2
        self.dropout = nn.Dropout(dropout)

    def attend(self, x: Tensor, **attention_kwargs) -> Tensor:
        return self.dropout(self.attention(x, **attention_kwargs))

    def feed_forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.ffn(x))

    def forward(
        self,
        x: Tensor,
        *,
        position: Position,
        positions: Tensor,
        mask: AttentionMask,
        cache: KVCache | None = None,
    ) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim); keyword arguments as in :meth:`Attention.forward`."""
        raise NotImplementedError


class BlockFactory(Protocol):
    def __call__(
        self, *, attention: Attention, ffn: FeedForward, norm_1: Norm, norm_2: Norm, dropout: float
    ) -> Block: ...


class Adapter:
    """Parameter-efficient fine-tuning: changes matching sub-modules of a built model in place.

    Adapters touch only ``nn.Linear``, ``nn.Embedding`` and attention's public
    ``*_proj`` attributes, so they compose with every attention plugin.

    Args:
        targets: glob patterns over module names, e.g. ``["*.q_proj", "*.v_proj"]``.
    """

    def __init__(self, targets: Sequence[str] = ("*.q_proj", "*.v_proj")) -> None:
        self.targets = list(targets)

    def apply(self, model: nn.Module) -> nn.Module:
        """Swap matching modules and mark only adapter parameters trainable."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold adapter weights back into the base modules where the math allows."""
        raise NotImplementedError


def aux_loss(model: nn.Module) -> Tensor | float:
    """Sum of the auxiliary losses the last forward pass left on ``model``'s sub-modules."""
    losses: Iterable[Tensor] = (m.aux_loss for m in model.modules() if getattr(m, "aux_loss", None) is not None)
    return sum(losses, 0.0)


def module_metrics(model: nn.Module) -> dict[str, Tensor]:
    """Mean over sub-modules of what each one's ``metrics()`` says about its last forward.

    A plugin that has something worth logging (a mixture-of-experts layer's per-expert load)
    defines ``metrics() -> dict[str, Tensor]``; tasks log the result under ``train/``.
    """
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for module in model.modules():
        report = getattr(module, "metrics", None)
        if module is model or not callable(report):
            continue
        for key, value in report().items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    return {key: total / counts[key] for key, total in sums.items()}
