"""Pre-norm residual block: GPT-2, Llama and most modern decoders."""

from __future__ import annotations

from torch import Tensor

from lightningllm.cache import KVCache
from lightningllm.contracts import Block, Position
from lightningllm.mask import AttentionMask
from lightningllm.registry import register


@register("block")
class PreNorm(Block):
    """Normalise each branch's input, leave the residual stream untouched.

    Xiong et al. (2020), "On Layer Normalization in the Transformer Architecture"; used by GPT-2
    (Radford et al., 2019), Llama and T5 (Raffel et al., 2020). The residual stream is never
    normalised inside the block, so the model applies a final norm after the last block.

    Args:
        attention, ffn, norm_1, norm_2: built children.
        dropout: residual dropout on each branch's output.
        dim: model width; the model passes it (used by ``layer_scale``).
        drop_path: stochastic depth (Huang et al., 2016): in training, drop each branch for a whole
            sample with this probability, scaling kept ones by ``1/(1 - drop_path)``; in [0, 1).
        layer_scale: initial value of a learnable per-channel scale on each branch's output
            (LayerScale, Touvron et al., 2021); ``None`` turns it off.
    """

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

        With a ``cross_attention`` child, a third branch ``x + cross_attention(norm_cross(x), context)``
        (built like the attention branch) runs between the attention and the feed-forward branches,
        as in T5's decoder; ``context``, ``context_mask`` and ``cross_cache`` go to it.

        ::

            x ---------------+
            |                |
            norm_1           |
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
            +----------------+
            |                |
            norm_2           |
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
            out
        """
        x = x + self.attend(self.norm_1(x), position=position, positions=positions, mask=mask, cache=cache)
        if self.check_context(context):
            x = x + self.cross_attend(
                self.norm_cross(x), context=context, context_mask=context_mask, cache=cross_cache,
                position=position, positions=positions,
            )  # fmt: skip
        return x + self.feed_forward(self.norm_2(x))
