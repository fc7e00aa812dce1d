"""Post-norm residual block: the original Transformer and BERT."""

from __future__ import annotations

from torch import Tensor

from lightningllm.cache import KVCache
from lightningllm.contracts import Block, Position
from lightningllm.mask import AttentionMask
from lightningllm.registry import register


@register("block")
class PostNorm(Block):
    """Normalise the residual stream after each branch is added: ``LayerNorm(x + Sublayer(x))``.

    Vaswani et al. (2017), "Attention Is All You Need", section 5.4; BERT (Devlin et al., 2019).
    Deep post-norm stacks usually need learning-rate warm-up (Xiong et al., 2020).

    Args:
        attention, ffn, norm_1, norm_2: built children.
        dropout: residual dropout on each branch's output.
        dim: model width; the model passes it (used by ``layer_scale``).
        drop_path: stochastic depth (Huang et al., 2016): in training, drop each branch for a whole
            sample with this probability, scaling kept ones by ``1/(1 - drop_path)``; in [0, 1).
        layer_scale: initial value of a learnable per-channel scale on each branch's output
            (LayerScale, Touvron et al., 2021); ``None`` turns it off.
    """

    final_norm = False  # the output of the last block is already normalised

    def forward(
        self,
        x: Tensor,
        *,
        position: Position,
        positions: Tensor,
        mask: AttentionMask,
        cache: KVCache | None = None,
        context: Tensor | None = None,
        context_mask: AttentionMask | None = None,
        cross_cache: KVCache | None = None,
    ) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim); keyword arguments go to the attention.

        With a ``cross_attention`` child, the original Transformer's decoder layer (Vaswani et al.,
        2017, section 3.1): ``x = norm_cross(x + cross_attention(x, context))`` runs between the
        attention and the feed-forward sub-layers; ``context``, ``context_mask`` and ``cross_cache``
        go to it.

        ::

            x ---------------+
            |                |
            attention        |
            |                |
            dropout          |
            |                |
            * layer_scale    |
            |                |
            drop_path        |
            |                |
            + <--------------+
            |
            norm_1
            |
            +----------------+
            |                |
            ffn              |
            |                |
            dropout          |
            |                |
            * layer_scale    |
            |                |
            drop_path        |
            |                |
            + <--------------+
            |
            norm_2
            |
            out
        """
        x = self.norm_1(x + self.attend(x, position=position, positions=positions, mask=mask, cache=cache))
        if self.check_context(context):
            x = self.norm_cross(
                x + self.cross_attend(
                    x, context=context, context_mask=context_mask, cache=cross_cache, position=position,
                    positions=positions,
                )
            )  # fmt: skip
        return self.norm_2(x + self.feed_forward(x))
