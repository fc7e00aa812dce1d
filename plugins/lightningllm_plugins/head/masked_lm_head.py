"""BERT's masked-language-model head: dense, GELU, norm, then the (tied) projection to the vocabulary."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightningllm.contracts import Head, NormFactory
from lightningllm.registry import register


@register("head")
class MaskedLMHead(Head):
    """``proj(norm(gelu(transform(hidden))))``, Devlin et al. (2019), "BERT", appendix A.

    ``transform`` is a dense (dim, dim) layer, ``norm`` the model's norm plugin and ``proj`` a
    projection to the vocabulary with a bias, whose weight is the token embedding when the model ties.

    Args:
        dim: model width.
        vocab_size: rows of the projection.
        norm: the model's norm factory (BERT: LayerNorm).
        embedding: the token embedding to share the projection's weight with, or None.
        logit_scale: multiplies the logits.
    """

    def __init__(
        self, *, dim: int, vocab_size: int, norm: NormFactory, embedding: nn.Embedding | None = None,
        logit_scale: float = 1.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.transform = nn.Linear(dim, dim)
        self.norm = norm(dim=dim)
        self.proj = nn.Linear(dim, vocab_size, bias=True)
        if embedding is not None:
            self.proj.weight = embedding.weight
        self.logit_scale = logit_scale

    def forward(self, hidden: Tensor, *, padding: Tensor | None = None) -> Tensor:
        """hidden: (B, T, dim) -> logits (B, T, vocab_size)."""
        logits = self.proj(self.norm(F.gelu(self.transform(hidden))))
        return logits * self.logit_scale if self.logit_scale != 1.0 else logits
