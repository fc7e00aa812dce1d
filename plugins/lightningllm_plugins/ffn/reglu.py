"""ReGLU: the GLU with a ReLU gate."""

from __future__ import annotations

from lightningllm.registry import register
from lightningllm_plugins.ffn.glu import GLU


@register("ffn")
class ReGLU(GLU):
    """``down_proj(relu(gate_proj(x)) * up_proj(x))`` (Shazeer, 2020, "GLU Variants Improve Transformer").

    Args:
        dim: model width.
        hidden_dim: inner width, as given by the model.
        dropout: dropout on the gated hidden activations.
        bias: add biases to the three projections (the paper has none).
    """

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__(dim, hidden_dim, dropout=dropout, activation="relu", bias=bias)
