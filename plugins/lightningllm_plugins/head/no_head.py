"""No head: the model returns its final hidden states (a headless encoder, sentence embeddings)."""

from __future__ import annotations

from torch import Tensor, nn

from lightningllm.contracts import Head, NormFactory
from lightningllm.registry import register


@register("head")
class NoHead(Head):
    """The identity: ``forward`` gives the backbone's hidden states (B, T, dim) unchanged; no parameters.

    What a Hugging Face base model (``BertModel``) converts to, and what a backbone exports with when
    its task head is not wanted.

    Args:
        dim, vocab_size, norm, embedding, logit_scale: passed by the model; unused.
    """

    outputs = "hidden"

    def __init__(
        self, *, dim: int = 0, vocab_size: int = 0, norm: NormFactory | None = None,
        embedding: nn.Embedding | None = None, logit_scale: float = 1.0,
    ) -> None:  # fmt: skip
        super().__init__()

    def forward(self, hidden: Tensor, *, padding: Tensor | None = None) -> Tensor:
        """hidden: (B, T, dim) -> the same tensor."""
        return hidden
