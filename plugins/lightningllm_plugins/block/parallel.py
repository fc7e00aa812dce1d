"""Parallel block: attention and feed-forward read the same input (GPT-J, GPT-NeoX, PaLM)."""

from __future__ import annotations

import math

from torch import Tensor

from lightningllm.cache import KVCache
from lightningllm.contracts import Attention, Block, FeedForward, Norm, Position
from lightningllm.mask import AttentionMask
from lightningllm.registry import register


@register("block")
class Parallel(Block):
    """``x + attention(norm_1(x)) + ffn(norm(x))``: one residual add per layer instead of two.

    GPT-J (Wang & Komatsuzaki, 2021) and PaLM (Chowdhery et al., 2022, section 2) share one norm
    between the branches; GPT-NeoX (Black et al., 2022) gives the feed-forward its own. With
    ``shared_norm`` the model's second norm is dropped (``norm_2`` is ``None``), so no parameter
    goes unused, which DDP would reject.

    Args:
        attention, ffn, norm_1, norm_2: built children.
        dropout: residual dropout on each branch's output.
        dim: model width; the model passes it (used by ``layer_scale``).
        drop_path: stochastic depth (Huang et al., 2016): in training, drop each branch for a whole
            sample with this probability, scaling kept ones by ``1/(1 - drop_path)``; in [0, 1).
        layer_scale: initial value of a learnable per-channel scale on each branch's output
            (LayerScale, Touvron et al., 2021); ``None`` turns it off.
        shared_norm: feed ``norm_1(x)`` to both branches (GPT-J, PaLM); ``False`` feeds the
            feed-forward ``norm_2(x)`` (GPT-NeoX).
        scale_residual: multiply the sum of the branches by ``1/sqrt(number of branches)`` (2, or 3
            with cross-attention) so the residual stream's variance grows as with a single branch.
        cross_attention: built attention child reading ``context`` (an encoder-decoder's decoder);
            None: no cross-attention.
        norm_cross: its input norm; dropped (``None``) with ``shared_norm``, like ``norm_2``.

    Cross-attention runs as a third parallel branch: ``x + attention(h) + cross_attention(h_c,
    context) + ffn(h_f)``, every branch reading the layer input ``x`` (``h_c = h_f = h = norm_1(x)``
    with ``shared_norm``, else ``norm_cross(x)`` and ``norm_2(x)``). This keeps the layout's point,
    one residual add and branches that can run concurrently (their input projections fuse), at the
    price that a layer's cross-attention queries do not see that layer's self-attention output (the
    next layer's do). Sequential layouts (:class:`PreNorm`, :class:`PostNorm`) run self-attention
    -> cross-attention -> feed-forward instead, as T5 and Vaswani et al. (2017) do.
    """

    def __init__(
        self,
        attention: Attention,
        ffn: FeedForward,
        norm_1: Norm,
        norm_2: Norm,
        dropout: float = 0.0,
        shared_norm: bool = True,
        scale_residual: bool = False,
        *,
        dim: int | None = None,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        cross_attention: Attention | None = None,
        norm_cross: Norm | None = None,
    ) -> None:
        super().__init__(
            attention, ffn, norm_1, norm_2, dropout, dim=dim, drop_path=drop_path, layer_scale=layer_scale,
            cross_attention=cross_attention, norm_cross=norm_cross,
        )  # fmt: skip
        self.shared_norm, self.scale_residual = shared_norm, scale_residual
        if shared_norm:
            self.norm_2 = None
            self.norm_cross = None
        n_branches = 2 if cross_attention is None else 3
        self.branch_scale = 1 / math.sqrt(n_branches) if scale_residual else 1.0

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

        With a ``cross_attention`` child, ``context``, ``context_mask`` and ``cross_cache`` go to a
        third branch beside the two drawn below (see the class docstring).

        ::

            x ------------+----------------------+
            |             |                      |
            |             norm_1 --(shared)--+   norm_2 (shared_norm=False)
            |             |                  |   |
            |             attention          +-> ffn
            |             |                      |
            |             dropout                dropout
            |             |                      |
            |             * layer_scale          * layer_scale
            |             |                      |
            |             drop_path              drop_path (drawn independently)
            |             |                      |
            |             +------> (+) <---------+
            |                       |
            |                       * 1/sqrt(2) (scale_residual)
            |                       |
            + <---------------------+
            |
            out
        """
        h = self.norm_1(x)
        branches = self.attend(h, position=position, positions=positions, mask=mask, cache=cache)
        if self.check_context(context):
            branches = branches + self.cross_attend(
                h if self.norm_cross is None else self.norm_cross(x), context=context, context_mask=context_mask,
                cache=cross_cache, position=position, positions=positions,
            )  # fmt: skip
        branches = branches + self.feed_forward(h if self.norm_2 is None else self.norm_2(x))
        return x + branches * self.branch_scale if self.scale_residual else x + branches

    def extra_repr(self) -> str:
        layout = f"shared_norm={self.shared_norm}, scale_residual={self.scale_residual}"
        return ", ".join(part for part in (layout, super().extra_repr()) if part)
