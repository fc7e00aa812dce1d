"""Layer normalisation: the norm of the original Transformer, BERT and GPT-2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightningllm.checks import check_number
from lightningllm.contracts import Norm
from lightningllm.registry import register


@register("norm")
class LayerNorm(Norm):
    """``(x - mean(x)) / sqrt(var(x) + eps) * weight + bias`` over the last dimension.

    Ba, Kiros & Hinton (2016), "Layer Normalization". Statistics are computed in float32 and the
    result is cast back to the input's dtype, so bf16/fp16 activations keep their dtype.

    Args:
        dim: width of the normalised (last) dimension.
        eps: added to the variance for numerical stability.
        bias: learn an additive bias (``False``: scale only, as in OLMo and some GPT-NeoX variants).
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        check_number("LayerNorm", "eps", eps, 0.0)
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight to ones, bias to zeros: the identity affine map."""
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., dim) -> (..., dim), same dtype as ``x``."""
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), (self.dim,), self.weight.float(), bias, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"
