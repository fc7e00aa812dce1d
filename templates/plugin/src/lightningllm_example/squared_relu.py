"""Squared-ReLU feed-forward: the MLP of Primer."""

from __future__ import annotations

import torch.nn.functional as F
from lightningllm.contracts import FeedForward
from lightningllm.registry import register
from torch import Tensor, nn


@register("ffn")
class SquaredReLU(FeedForward):
    """``down_proj(dropout(relu(up_proj(x)) ** 2))``: the squared-ReLU MLP of Primer (So et al., 2021).

    In "Primer: Searching for Efficient Transformers for Language Modeling" an architecture search
    found that squaring the ReLU of the hidden activations improves language modelling at no cost in
    parameters. The model passes ``dim``, ``hidden_dim`` and ``dropout``; in YAML
    only the plugin's own knob (``bias``) is set: ``ffn: {class_path: SquaredReLU, init_args: {bias: true}}``.

    Args:
        dim: model width.
        hidden_dim: inner width (the model decides, e.g. ``4 * dim``).
        dropout: dropout on the hidden activations.
        bias: add biases to both projections (Primer's T5-style layers have none).
    """

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        # Shared sub-module names (see lightningllm.contracts.FeedForward): the model scales the init of
        # ``down_proj`` as a residual output, and adapters find projections by these names.
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        # A plugin that creates its own nn.Parameter must also define reset_parameters() so that a model
        # built on the meta device can be initialised; nn.Linear already has one.

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim)."""
        h = F.relu(self.up_proj(x)).square()  # (B, T, hidden_dim)
        return self.down_proj(self.dropout(h))  # (B, T, dim)
