"""SwiGLU: the gated feed-forward of PaLM and Llama."""

from __future__ import annotations

from lightningllm.registry import register
from lightningllm_plugins.ffn.glu import GLU


@register("ffn")
class SwiGLU(GLU):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` (Shazeer, 2020, "GLU Variants Improve Transformer").

    The GLU with a Swish gate (Ramachandran et al., 2017; Swish with beta = 1 is SiLU), as used by
    PaLM and Llama.

    Args:
        dim: model width.
        hidden_dim: inner width, as given by the model (Llama: about ``8/3 * dim``).
        dropout: dropout on the gated hidden activations.
        bias: add biases to the three projections (the paper has none).
    """

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__(dim, hidden_dim, dropout=dropout, activation="silu", bias=bias)
