"""Root-mean-square normalisation: the norm of T5, Llama and most recent decoders."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightningllm.checks import check_number
from lightningllm.contracts import Norm
from lightningllm.registry import register


@register("norm")
class RMSNorm(Norm):
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last dimension; no centring, no bias.

    Zhang & Sennrich (2019), "Root Mean Square Layer Normalization". Computed in float32 and cast
    back to the input's dtype, so bf16/fp16 activations keep their dtype.

    Args:
        dim: width of the normalised (last) dimension.
        eps: added to the mean square for numerical stability.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        check_number("RMSNorm", "eps", eps, 0.0)
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight to ones: the identity scale."""
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., dim) -> (..., dim), same dtype as ``x``."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., dim)
        return (x32 * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
