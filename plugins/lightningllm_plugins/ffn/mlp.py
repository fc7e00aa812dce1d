"""Two-layer perceptron: the feed-forward of the original Transformer, GPT-2 and BERT."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from lightningllm.contracts import FeedForward
from lightningllm.errors import ConfigError
from lightningllm.registry import register

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
}


@register("ffn")
class MLP(FeedForward):
    """``down_proj(dropout(act(up_proj(x))))`` (Vaswani et al., 2017, "Attention Is All You Need", eq. 2).

    ReLU is the original Transformer's choice; GELU (Hendrycks & Gimpel, 2016) is BERT's, and its
    tanh approximation is GPT-2's.

    Args:
        dim: model width.
        hidden_dim: inner width (the model decides, e.g. ``4 * dim``).
        dropout: dropout on the hidden activations.
        activation: ``relu``, ``gelu`` (exact), ``gelu_tanh`` (tanh approximation) or ``silu``.
        bias: add biases to both projections.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        dropout: float = 0.0,
        activation: Literal["relu", "gelu", "gelu_tanh", "silu"] = "gelu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"MLP activation={activation!r} is not supported. Choose one of: {', '.join(ACTIVATIONS)}."
            )
        self.activation = activation
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim)."""
        h = self.dropout(self.act(self.up_proj(x)))  # (B, T, hidden_dim)
        return self.down_proj(h)
