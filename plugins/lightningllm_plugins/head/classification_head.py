"""Sequence classification head: pool the hidden states, dropout, one linear layer to class logits."""

from __future__ import annotations

from torch import Tensor, nn

from lightningllm.contracts import Head, NormFactory
from lightningllm.errors import ConfigError
from lightningllm.pooling import Pooling, check_pooling, pool
from lightningllm.registry import register


@register("head")
class ClassificationHead(Head):
    """``proj(dropout(pool(hidden)))``: (B, T, dim) -> class logits (B, n_classes).

    Pooling picks the sequence's vector: ``last`` real token (the one a causal model has read the
    whole sequence at; GPT-style classifiers, Radford et al., 2018), ``first`` real token (BERT's
    [CLS], Devlin et al., 2019) or ``mean`` over the real tokens. Padding may be on either side.

    Args:
        dim: model width (passed by the model).
        n_classes: number of classes (>= 2).
        pooling: ``last``, ``first`` or ``mean``.
        dropout: dropout on the pooled vector in training.
        labels: the class names in class-id order, recorded so an export names its classes (None: unnamed).
        vocab_size, norm, embedding, logit_scale: passed by the model; unused.
    """

    outputs = "classes"

    def __init__(
        self, *, dim: int, n_classes: int, pooling: Pooling = "last", dropout: float = 0.0,
        labels: list[str] | None = None, vocab_size: int = 0, norm: NormFactory | None = None,
        embedding: nn.Embedding | None = None, logit_scale: float = 1.0,
    ) -> None:  # fmt: skip
        super().__init__()
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
            raise ConfigError(
                f"ClassificationHead n_classes={n_classes!r} is not allowed: give the number of classes, an integer "
                ">= 2 (for one score per sequence use ScalarHead)."
            )
        check_pooling(pooling, "ClassificationHead")
        if labels is not None and (len(labels) != n_classes or len(set(labels)) != n_classes):
            raise ConfigError(
                f"ClassificationHead labels={labels!r} must be n_classes={n_classes} distinct class names, in class-id "
                "order (or null)."
            )
        self.n_classes, self.pooling, self.labels = n_classes, pooling, None if labels is None else list(labels)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, n_classes)

    def forward(self, hidden: Tensor, *, padding: Tensor | None = None) -> Tensor:
        """hidden: (B, T, dim), padding: (B, T) bool True at real tokens -> logits (B, n_classes)."""
        return self.proj(self.dropout(pool(hidden, padding, self.pooling)))  # (B, n_classes)
