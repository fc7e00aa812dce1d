"""Gated linear unit feed-forward with a configurable gate activation."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from lightningllm.contracts import FeedForward
from lightningllm.errors import ConfigError
from lightningllm.registry import register

ACTIVATIONS = {
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
}


@register("ffn")
class GLU(FeedForward):
    """``down_proj(dropout(act(gate_proj(x)) * up_proj(x)))``.

    The gated linear unit of Dauphin et al. (2017), "Language Modeling with Gated Convolutional
    Networks", used as a Transformer feed-forward by Shazeer (2020), "GLU Variants Improve
    Transformer" (``FFN_GLU(x, W, V, W2) = (sigmoid(xW) * xV) W2``, biases omitted). Swapping the
    sigmoid gives the variants :class:`SwiGLU` (SiLU), :class:`GEGLU` (GELU) and :class:`ReGLU` (ReLU).

    Args:
        dim: model width.
        hidden_dim: inner width, as given by the model (Llama uses about ``8/3 * dim`` so that three
            matrices cost what the two of a ``4 * dim`` MLP do).
        dropout: dropout on the gated hidden activations.
        activation: gate activation: ``sigmoid``, ``silu``, ``gelu``, ``gelu_tanh`` or ``relu``.
        bias: add biases to the three projections (the paper has none).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        dropout: float = 0.0,
        activation: Literal["sigmoid", "silu", "gelu", "gelu_tanh", "relu"] = "sigmoid",
        bias: bool = False,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"{type(self).__name__} activation={activation!r} is not supported. "
                f"Choose one of: {', '.join(ACTIVATIONS)}."
            )
        self.activation = activation
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim)."""
        h = self.act(self.gate_proj(x)) * self.up_proj(x)  # (B, T, hidden_dim)
        return self.down_proj(self.dropout(h))
