"""Learned absolute position embeddings (GPT-2, BERT)."""

from __future__ import annotations

from torch import Tensor, nn

from lightningllm.contracts import Position
from lightningllm.errors import ConfigError
from lightningllm.registry import register


@register("position")
class LearnedPosition(Position):
    """A trainable vector per absolute position, added to the token embeddings.

    As in GPT (Radford et al., 2018) and BERT (Devlin et al., 2019). The table has
    ``max_seq_len`` rows, so longer sequences cannot be encoded.

    Args:
        dim: model width.
        n_heads: query heads (unused).
        head_dim: per-head width (unused).
        max_seq_len: rows of the table: the most positions this model can encode.
        init_std: std of the normal initialisation of the table.
    """

    def __init__(self, dim: int, n_heads: int, head_dim: int, max_seq_len: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.init_std = init_std
        self.table = nn.Embedding(max_seq_len, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.table.weight, mean=0.0, std=self.init_std)

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: (B, T, dim), positions: (B or 1, T) -> x + table[positions], (B, T, dim)."""
        return x + self.table(positions).to(x.dtype)

    def check_length(self, length: int) -> None:
        if length > self.max_seq_len:
            raise ConfigError(
                f"A sequence of {length} positions does not fit LearnedPosition's table of max_seq_len="
                f"{self.max_seq_len} learned position embeddings. Shorten the input (or generation length) to "
                f"at most {self.max_seq_len} tokens, or train a model with a larger max_seq_len."
            )
