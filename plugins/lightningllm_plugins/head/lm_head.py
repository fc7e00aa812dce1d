"""Language-model head: hidden states to next-token logits, tied to the token embedding or not."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightningllm.contracts import Head, NormFactory
from lightningllm.registry import register


@register("head")
class LMHead(nn.Linear, Head):
    """``logits = logit_scale * hidden @ W^T`` with ``W`` (vocab_size, dim) the embedding when tied.

    Press & Wolf (2017), "Using the Output Embedding to Improve Language Models" (tying). The model
    passes its embedding when it ties (``tie_embeddings``) and ``logit_scale`` (1/sqrt(dim) with
    ``scale_logits``, as T5 does with tied embeddings; else 1). Its weight is ``head.weight`` in the
    state dict.

    Args:
        dim: model width.
        vocab_size: rows of the output projection.
        norm: unused (the model passes its norm factory to every head).
        embedding: the token embedding to share the weight with, or None for an untied head.
        logit_scale: multiplies the logits.
        bias: learn an output bias.
    """

    def __init__(
        self,
        *,
        dim: int,
        vocab_size: int,
        norm: NormFactory | None = None,
        embedding: nn.Embedding | None = None,
        logit_scale: float = 1.0,
        bias: bool = False,
    ) -> None:
        super().__init__(dim, vocab_size, bias=bias)
        if embedding is not None:
            self.weight = embedding.weight
        self.logit_scale = logit_scale

    def forward(self, hidden: Tensor, *, padding: Tensor | None = None) -> Tensor:
        """hidden: (B, T, dim) -> logits (B, T, vocab_size)."""
        logits = F.linear(hidden, self.weight, self.bias)
        return logits * self.logit_scale if self.logit_scale != 1.0 else logits
