"""T5's relative position bias: a learned scalar per head and per bucket of query-key distances."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightningllm.contracts import Position
from lightningllm.errors import ConfigError
from lightningllm.registry import register


def relative_position_bucket(
    relative_position: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """Bucket of each ``key position - query position`` (T5, Raffel et al., 2020, section 2.1).

    Bidirectional: half of the buckets for keys before the query (and the query itself), half for
    keys after it. Unidirectional (causal): every bucket for keys at or before the query, keys after
    it share bucket 0 (the causal mask hides them). Within a direction, the first half of the buckets
    hold the distances 0, 1, ... one each, the second half logarithmically wider ranges up to
    ``max_distance``; farther keys share the last bucket. As HF's ``T5Attention._relative_position_bucket``
    and Mesh TensorFlow's ``_relative_position_bucket``.

    Args:
        relative_position: int tensor of ``key position - query position``, any shape.
        bidirectional: whether keys after the query have buckets of their own.
        num_buckets: buckets in all.
        max_distance: distance from which on keys share the last bucket of their direction.

    Returns:
        int64 tensor of the same shape, values in ``[0, num_buckets)``.
    """
    buckets = torch.zeros_like(relative_position, dtype=torch.long)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets  # keys after the query
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)  # keys after the query fall into bucket 0
    max_exact = num_buckets // 2
    # log-spaced buckets for max_exact <= distance < max_distance; the clamp keeps log() finite where
    # the exact branch is taken anyway
    log_ratio = torch.log(distance.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


@register("position")
class RelativePositionBias(Position):
    """A learned bias per head added to each attention score, looked up by the bucket of its distance.

    "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer" (T5; Raffel
    et al., 2020, section 2.1): no position embeddings; every self-attention layer of a stack adds
    ``table[bucket(key position - query position), head]`` to its scores, one table per stack shared
    by all its layers (:func:`relative_position_bucket` gives the buckets). Cross-attention gets no
    bias (our attention applies ``bias`` to self-attention only).

    T5's encoder buckets bidirectionally and its decoder causally, each with its own table: in an
    :class:`~lightningllm.models.encoder_decoder.EncoderDecoder` give ``position`` this plugin with
    ``bidirectional: true`` and ``decoder_position`` one with ``bidirectional: false``. Each stack
    builds its own plugin, so the tables are separate either way.

    Args:
        dim: model width (unused).
        n_heads: query heads: one bias per head and bucket.
        head_dim: per-head width (unused).
        max_seq_len: longest training sequence (unused: distances past ``max_distance`` share a bucket,
            so any length can be encoded).
        num_buckets: buckets of distances (T5: 32).
        max_distance: distance from which on keys share the last bucket (T5: 128).
        bidirectional: keys after the query get buckets of their own (encoder); False: causal bucketing
            (decoder), every bucket spent on keys at or before the query.
        init_std: std of the normal initialisation of the table.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        head_dim: int,
        max_seq_len: int,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
        if max_exact < 1 or max_distance <= max_exact:
            direction = "bidirectional" if bidirectional else "unidirectional"
            raise ConfigError(
                f"RelativePositionBias num_buckets={num_buckets}, max_distance={max_distance} ({direction}) leave "
                f"no logarithmic buckets: give num_buckets >= {4 if bidirectional else 2} and max_distance above the "
                f"{max(max_exact, 1)} exact distances (T5: num_buckets=32, max_distance=128)."
            )
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.init_std = init_std
        self.table = nn.Embedding(num_buckets, n_heads)  # (buckets, H), HF's relative_attention_bias
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) biases."""
        nn.init.normal_(self.table.weight, mean=0.0, std=self.init_std)

    def bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        """q_positions: (B or 1, T), k_positions: (B or 1, S) -> bias (B or 1, H, T, S) in the table's dtype."""
        relative = k_positions[:, None, :] - q_positions[:, :, None]  # (B, T, S)
        buckets = relative_position_bucket(
            relative, bidirectional=self.bidirectional, num_buckets=self.num_buckets, max_distance=self.max_distance
        )  # (B, T, S)
        return self.table(buckets).permute(0, 3, 1, 2)  # (B, T, S, H) -> (B, H, T, S)

    def extra_repr(self) -> str:
        return f"num_buckets={self.num_buckets}, max_distance={self.max_distance}, bidirectional={self.bidirectional}"
