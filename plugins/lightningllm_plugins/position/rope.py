"""Rotary position embeddings (RoPE) with optional context-extension scaling."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightningllm.contracts import Position
from lightningllm.errors import ConfigError
from lightningllm.registry import register

SCALINGS = ("none", "linear", "ntk")


@register("position")
class RoPE(Position):
    """Rotate each query/key pair of channels by an angle proportional to its position.

    RoFormer (Su et al., 2021). Channel ``i`` of the first half of a head is paired with
    channel ``i + head_dim/2`` (the "rotate half" layout of GPT-NeoX and Hugging Face Llama)
    and rotated by ``pos * base ** (-2i / head_dim)``, so the score of a query at ``m``
    and a key at ``n`` depends on ``m - n`` only.

    Scaling stretches a model to longer contexts:

    - ``linear``: position interpolation (Chen et al., 2023): positions are divided by ``factor``.
    - ``ntk``: NTK-aware scaling (bloc97, 2023): ``base * factor ** (head_dim / (head_dim - 2))``.

    Args:
        dim: model width (unused).
        n_heads: query heads (unused).
        head_dim: per-head width; must be even.
        max_seq_len: longest training sequence (unused: any position can be rotated).
        base: the wavelength base (10000 in RoFormer and Llama 2; 500000 in Llama 3).
        scaling: ``none``, ``linear`` or ``ntk``.
        factor: context extension factor for ``linear`` and ``ntk`` scaling.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        head_dim: int,
        max_seq_len: int,
        base: float = 10000.0,
        scaling: Literal["none", "linear", "ntk"] = "none",
        factor: float = 1.0,
    ) -> None:
        super().__init__()
        _check(head_dim, base, scaling, factor)
        self.head_dim, self.scaling, self.factor = head_dim, scaling, factor
        self.base = base * factor ** (head_dim / (head_dim - 2)) if scaling == "ntk" else base
        self.position_scale = 1.0 / factor if scaling == "linear" else 1.0

    def inv_freq(self, device: torch.device | None = None) -> Tensor:
        """float32 angular frequencies ``base ** (-2i / head_dim)``, (head_dim / 2,).

        Computed on demand (no buffer), so they stay float32 whatever dtype the model is cast to.
        """
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / self.base**exponents

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions: (B or 1, T) -> float32 cos, sin of shape (B or 1, 1, T, head_dim)."""
        inv_freq = self.inv_freq(positions.device)
        angles = (positions.float() * self.position_scale)[..., None] * inv_freq  # (B, T, hd/2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, hd)
        return angles.cos(), angles.sin()

    def rotate(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """q: (B, H, T, hd), k: (B, Hkv, T, hd), positions: (B or 1, T) -> same shapes and dtypes."""
        cos, sin = self.cos_sin(positions)
        return _apply(q, cos, sin), _apply(k, cos, sin)


def _apply(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)  # (B, H, T, hd/2) each
    rotated = torch.cat((-x2, x1), dim=-1)  # rotate_half
    return (x32 * cos + rotated * sin).to(x.dtype)


def _check(head_dim: int, base: float, scaling: str, factor: float) -> None:
    if head_dim % 2:
        raise ConfigError(
            f"RoPE rotates pairs of channels, so head_dim must be even, got head_dim={head_dim}. "
            "Choose dim and n_heads so that dim // n_heads is even."
        )
    if base <= 0:
        raise ConfigError(f"RoPE base={base} must be positive (10000 is the usual value).")
    if scaling not in SCALINGS:
        raise ConfigError(f"RoPE scaling={scaling!r} is unknown; choose one of {', '.join(SCALINGS)}.")
    if factor <= 0:
        raise ConfigError(f"RoPE factor={factor} must be positive (the context extension ratio, e.g. 4.0).")
    if scaling == "none" and factor != 1.0:
        raise ConfigError(
            f"RoPE factor={factor} has no effect with scaling='none'. Set scaling to 'linear' or 'ntk' to "
            "extend the context, or leave factor at 1.0."
        )
    if scaling == "ntk" and head_dim <= 2:
        raise ConfigError(
            f"NTK-aware RoPE scaling needs head_dim > 2 (its base grows as factor ** (head_dim / (head_dim - 2))), "
            f"got head_dim={head_dim}. Use scaling='linear' instead."
        )
