"""Rotary position embeddings (RoPE) with optional context-extension scaling."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightningllm.contracts import Position
from lightningllm.errors import ConfigError
from lightningllm.registry import register

SCALINGS = ("none", "linear", "ntk", "llama3", "yarn")

#: knob -> (default, the scalings that use it); any other scaling refuses a non-default value.
SCALING_KNOBS = {
    "low_freq_factor": (1.0, ("llama3",)),
    "high_freq_factor": (4.0, ("llama3",)),
    "original_max_seq_len": (8192, ("llama3", "yarn")),
    "beta_fast": (32.0, ("yarn",)),
    "beta_slow": (1.0, ("yarn",)),
    "attention_factor": (None, ("yarn",)),
    "truncate": (True, ("yarn",)),
}


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
    - ``llama3``: the frequency rule of Llama 3.1 (Grattafiori et al., 2024, "The Llama 3 Herd of Models"):
      with ``L = original_max_seq_len``, a channel whose wavelength ``2 pi / freq`` is longer than
      ``L / low_freq_factor`` has its frequency divided by ``factor``, one shorter than ``L / high_freq_factor``
      is kept, and in between ``freq * ((1 - s) / factor + s)`` with
      ``s = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)``.
    - ``yarn``: YaRN (Peng et al., 2023): channel ``d`` (of ``head_dim / 2``) blends the divided frequency
      ``freq / factor`` and the original one with weight ``ramp(d)`` rising linearly from 0 to 1 between the
      channels that turn ``beta_fast`` and ``beta_slow`` times over ``original_max_seq_len`` positions
      (``head_dim * ln(L / (2 pi beta)) / (2 ln base)``, rounded outwards when ``truncate``); the frequency
      is ``freq / factor * ramp + freq * (1 - ramp)``, and cos and sin are multiplied by ``attention_factor``
      (``0.1 ln(factor) + 1`` when None), which scales the attention logits by its square.

    Args:
        dim: model width (unused).
        n_heads: query heads (unused).
        head_dim: per-head width; must be even.
        max_seq_len: longest training sequence (unused: any position can be rotated).
        base: the wavelength base (10000 in RoFormer and Llama 2; 500000 in Llama 3).
        scaling: ``none``, ``linear``, ``ntk``, ``llama3`` or ``yarn``.
        factor: context extension factor for ``linear``, ``ntk``, ``llama3`` and ``yarn`` scaling.
        low_freq_factor: ``llama3`` only: wavelengths above ``original_max_seq_len / low_freq_factor`` are
            divided by ``factor`` (1.0 in Llama 3.1).
        high_freq_factor: ``llama3`` only: wavelengths below ``original_max_seq_len / high_freq_factor`` are
            kept (4.0 in Llama 3.1); must exceed ``low_freq_factor``.
        original_max_seq_len: ``llama3`` and ``yarn``: the pre-training context length (8192 in Llama 3.1).
        beta_fast: ``yarn`` only: channels turning more often than this over ``original_max_seq_len`` keep
            their frequency (32 in the paper).
        beta_slow: ``yarn`` only: channels turning less often than this are divided by ``factor`` (1 in the
            paper); must be below ``beta_fast``.
        attention_factor: ``yarn`` only: the multiplier of cos and sin; None: ``0.1 * ln(factor) + 1``
            (1 when ``factor <= 1``).
        truncate: ``yarn`` only: round the ramp's ends outwards to whole channels (floor and ceil).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        head_dim: int,
        max_seq_len: int,
        base: float = 10000.0,
        scaling: Literal["none", "linear", "ntk", "llama3", "yarn"] = "none",
        factor: float = 1.0,
        low_freq_factor: float = 1.0,
        high_freq_factor: float = 4.0,
        original_max_seq_len: int = 8192,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        attention_factor: float | None = None,
        truncate: bool = True,
    ) -> None:
        super().__init__()
        _check(head_dim, base, scaling, factor)
        knobs = dict(
            low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor,
            original_max_seq_len=original_max_seq_len, beta_fast=beta_fast, beta_slow=beta_slow,
            attention_factor=attention_factor, truncate=truncate,
        )  # fmt: skip
        _check_knobs(scaling, knobs)
        self.settings = {"base": base, "scaling": scaling, "factor": factor, **knobs}  # what resized() repeats
        self.head_dim, self.scaling, self.factor = head_dim, scaling, factor
        self.low_freq_factor, self.high_freq_factor = low_freq_factor, high_freq_factor
        self.original_max_seq_len = original_max_seq_len
        self.beta_fast, self.beta_slow, self.truncate = beta_fast, beta_slow, truncate
        self.base = base * factor ** (head_dim / (head_dim - 2)) if scaling == "ntk" else base
        self.position_scale = 1.0 / factor if scaling == "linear" else 1.0
        #: multiplier of cos and sin (YaRN's attention temperature); 1 for every other scaling
        self.mscale = 1.0
        if scaling == "yarn":
            self.mscale = attention_factor if attention_factor is not None else _yarn_mscale(factor)
        self._memo: tuple | None = None  # (positions, its _version, (cos, sin)) of the last cos_sin call

    def inv_freq(self, device: torch.device | None = None) -> Tensor:
        """float32 angular frequencies ``base ** (-2i / head_dim)`` (rescaled by llama3 and yarn), (head_dim / 2,).

        Computed on demand (no buffer), so they stay float32 whatever dtype the model is cast to.
        """
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        inv_freq = 1.0 / self.base**exponents
        if self.scaling == "llama3":
            return self._llama3(inv_freq)
        if self.scaling == "yarn":
            return self._yarn(exponents)
        return inv_freq

    def _llama3(self, inv_freq: Tensor) -> Tensor:
        """inv_freq: (head_dim / 2,) -> the Llama 3.1 rescaled frequencies, (head_dim / 2,)."""
        low, high, factor = self.low_freq_factor, self.high_freq_factor, self.factor
        wavelength = 2 * math.pi / inv_freq
        smooth = (self.original_max_seq_len / wavelength - low) / (high - low)  # 0 at L / low, 1 at L / high
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        kept = torch.where(wavelength < self.original_max_seq_len / high, inv_freq, blended)
        return torch.where(wavelength > self.original_max_seq_len / low, inv_freq / factor, kept)

    def yarn_ramp_ends(self) -> tuple[float, float]:
        """The (fractional or, with ``truncate``, whole) channels where YaRN's ramp starts and ends."""

        def channel(turns: float) -> float:  # the channel that turns ``turns`` times over original_max_seq_len
            ratio = self.original_max_seq_len / (turns * 2 * math.pi)
            return (self.head_dim * math.log(ratio)) / (2 * math.log(self.base))

        low, high = channel(self.beta_fast), channel(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, self.head_dim - 1)

    def _yarn(self, exponents: Tensor) -> Tensor:
        """exponents: (head_dim / 2,) ``2i / head_dim`` -> the YaRN frequencies, (head_dim / 2,)."""
        wavelength_scale = self.base**exponents  # 1 / freq
        low, high = self.yarn_ramp_ends()
        if low == high:
            high += 0.001  # a step instead of a ramp, without dividing by zero
        channels = torch.arange(self.head_dim // 2, dtype=torch.float32).to(exponents.device)
        ramp = ((channels - low) / (high - low)).clamp(0, 1)  # 0: keep the frequency, 1: divide it by factor
        kept = 1 - ramp
        return 1.0 / (self.factor * wavelength_scale) * (1 - kept) + 1.0 / wavelength_scale * kept

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions: (B or 1, T) -> float32 cos, sin of shape (B or 1, 1, T, head_dim).

        Every layer of a forward rotates at the same ``positions`` tensor: the tables of the last one are kept
        and reused while it is unchanged (its ``_version``), outside ``torch.compile`` (which shares them itself).
        """
        if torch.compiler.is_compiling():
            return self._cos_sin(positions)
        version = None if positions.is_inference() else positions._version  # inference tensors keep no version
        memo = self._memo
        if memo is None or memo[0] is not positions or memo[1] != version:
            memo = self._memo = (positions, version, self._cos_sin(positions))
        return memo[2]

    def _cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        inv_freq = self.inv_freq(positions.device)
        angles = (positions.float() * self.position_scale)[..., None] * inv_freq  # (B, T, hd/2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, hd)
        if self.mscale != 1.0:
            return angles.cos() * self.mscale, angles.sin() * self.mscale
        return angles.cos(), angles.sin()

    def rotate(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """q: (B, H, T, hd), k: (B, Hkv, T, hd), positions: (B or 1, T) -> same shapes and dtypes."""
        cos, sin = self.cos_sin(positions)
        return rotate_half(q, cos, sin), rotate_half(k, cos, sin)

    def resized(self, head_dim: int) -> RoPE:
        """The same rotation settings (base, scaling and its knobs) for heads of another width.

        Multi-head latent attention rotates only a few decoupled channels per head with them.
        """
        return RoPE(dim=head_dim, n_heads=1, head_dim=head_dim, max_seq_len=1, **self.settings)


def rotate_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE in the rotate-half layout, computed in float32. x: (..., T, hd), cos/sin broadcastable -> x's shape."""
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
            f"RoPE factor={factor} has no effect with scaling='none'. Set scaling to 'linear', 'ntk' or 'llama3' to "
            "extend the context, or leave factor at 1.0."
        )
    if scaling == "ntk" and head_dim <= 2:
        raise ConfigError(
            f"NTK-aware RoPE scaling needs head_dim > 2 (its base grows as factor ** (head_dim / (head_dim - 2))), "
            f"got head_dim={head_dim}. Use scaling='linear' instead."
        )


def _yarn_mscale(factor: float) -> float:
    """YaRN's default attention factor ``0.1 ln(factor) + 1`` (1 when the context is not extended)."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def _check_knobs(scaling: str, knobs: dict) -> None:
    defaults = {name: default for name, (default, _) in SCALING_KNOBS.items()}
    users = {name: " or ".join(map(repr, scalings)) for name, (_, scalings) in SCALING_KNOBS.items()}
    unused = [
        name for name, value in knobs.items() if scaling not in SCALING_KNOBS[name][1] and value != defaults[name]
    ]
    if unused:
        detail = "; ".join(f"{name}={knobs[name]!r} is used by scaling={users[name]}" for name in unused)
        raise ConfigError(
            f"RoPE scaling={scaling!r} does not use {', '.join(unused)} ({detail}). Set the matching scaling or "
            "leave these knobs at their defaults."
        )
    length = knobs["original_max_seq_len"]
    if scaling in ("llama3", "yarn") and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise ConfigError(
            f"RoPE original_max_seq_len={length!r} must be a positive integer: the context length the model was "
            "pre-trained with (8192 for Llama 3.1)."
        )
    low, high = knobs["low_freq_factor"], knobs["high_freq_factor"]
    if scaling == "llama3" and not 0 < low < high:
        raise ConfigError(
            f"RoPE llama3 scaling needs 0 < low_freq_factor < high_freq_factor, got low_freq_factor={low} and "
            f"high_freq_factor={high}: wavelengths between original_max_seq_len / high_freq_factor and "
            "original_max_seq_len / low_freq_factor are interpolated (Llama 3.1 uses 1.0 and 4.0)."
        )
    if scaling != "yarn":
        return
    fast, slow, attention_factor = knobs["beta_fast"], knobs["beta_slow"], knobs["attention_factor"]
    if not 0 < slow < fast:
        raise ConfigError(
            f"RoPE yarn scaling needs 0 < beta_slow < beta_fast, got beta_slow={slow} and beta_fast={fast}: they "
            "count the turns over original_max_seq_len below which a channel is divided by factor and above "
            "which it is kept (the paper uses 1 and 32)."
        )
    if attention_factor is not None and attention_factor <= 0:
        raise ConfigError(
            f"RoPE attention_factor={attention_factor} must be positive (it multiplies cos and sin), or None for "
            "YaRN's default 0.1 * ln(factor) + 1."
        )
