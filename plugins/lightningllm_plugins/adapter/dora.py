"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

The adapted weight is split into a magnitude and a direction, ``W' = m * (W + s B A) / ||W + s B A||``, with
the norm of each output row taken over the input dimension (the paper's column-wise norm of ``W`` stored
(in, out); PEFT's ``torch.linalg.norm(weight, dim=1)``). ``m`` (out_features,) starts at ``||W||`` and ``B`` at
zero, so a fresh adapter changes nothing. As the paper's section 4.3 advises (and PEFT does), the norm is
treated as a constant in the backward pass. Everything else (targets, rank, scaling, several named adapters,
merging) is LoRA's: :class:`DoRALinear` is a :class:`LoRALinear` with a magnitude per DoRA adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightningllm.contracts import Head
from lightningllm.errors import ConfigError
from lightningllm.registry import register
from lightningllm_plugins.adapter.lora import LoRA, LoRALinear


class DoRAMagnitude(nn.Module):
    """``m`` (out_features,), initialised by its own rule to the row norms of the base weight it sits beside.

    Args:
        base_layer: the frozen linear whose weight gives the initial magnitude (held, not registered).
    """

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self._base = [base_layer]  # a list keeps the base out of this module's children and state dict
        weight = base_layer.weight
        self.weight = nn.Parameter(torch.empty(weight.shape[0], device=weight.device, dtype=weight.dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """m = ||W|| row by row: B is zero at initialisation, so ||W + s B A|| = ||W||."""
        weight = self._base[0].weight
        if not (weight.is_meta or self.weight.is_meta):
            with torch.no_grad():
                self.weight.copy_(torch.linalg.norm(weight.float(), dim=1).to(self.weight.dtype))


class DoRALinear(LoRALinear):
    """``y = m / ||W + s B A|| * (W + s B A) x + bias`` for each DoRA adapter; adapters without a magnitude
    (a LoRA added to the same layer) add ``s B A x`` as LoRA does.

    Args:
        base_layer: the frozen linear it wraps.
    """

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.lora_magnitude_vector = nn.ModuleDict()
        self._merged_norms: dict[str, Tensor] = {}

    def add_dora(self, name: str, rank: int, scaling: float, dropout: float, init: str) -> None:
        """Add DoRA adapter ``name``: LoRA's A, B and scaling, and the magnitude m = ||W||."""
        self.add_adapter(name, rank, scaling, dropout, init)
        self.lora_magnitude_vector[name] = DoRAMagnitude(self.base_layer)

    def adapter_params(self, name: str) -> list[str]:
        magnitude = [f"lora_magnitude_vector.{name}.weight"] if name in self.lora_magnitude_vector else []
        return [*super().adapter_params(name), *magnitude]

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for magnitude in self.lora_magnitude_vector.values():
            magnitude.reset_parameters()

    def weight_norm(self, name: str) -> Tensor:
        """||W + s B A|| over the input dimension: (out_features,), detached (a constant for the gradient)."""
        weight = self.base_layer.weight + self.delta_weight(name).to(self.base_layer.weight.dtype)
        return torch.linalg.norm(weight, dim=1).detach()

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """x: (..., in_features) -> (..., out_features); extra arguments go to the base layer (a head's padding)."""
        out = self.base_layer(x, *args, **kwargs)
        if not self.enabled:
            return out
        for name in self.active:
            if name in self.merged:
                continue
            dropped = self.lora_dropout[name](x)
            lora = self.lora_B[name](self.lora_A[name](dropped)) * self.scaling[name]
            if name not in self.lora_magnitude_vector:
                out = out + lora * self._output_scale()
                continue
            scale = self.lora_magnitude_vector[name].weight / self.weight_norm(name)  # (out_features,)
            plain = F.linear(dropped, self.base_layer.weight)  # W x without bias, on the adapter's (dropped) input
            # m/n (W + sBA) x + bias, written as PEFT does: the base output plus (m/n - 1) W x + m/n sBA x
            out = out + ((scale - 1) * plain + scale * lora) * self._output_scale()
        return out

    def merge(self) -> None:
        if self.shared_weight:
            super().merge()  # refuses with LoRA's reason
        with torch.no_grad():
            weight = self.base_layer.weight
            for name in self.active:
                if name in self.merged:
                    continue
                if name in self.lora_magnitude_vector:
                    norm = self.weight_norm(name)
                    scale = (self.lora_magnitude_vector[name].weight / norm).to(weight.dtype)
                    weight.copy_(scale[:, None] * (weight + self.delta_weight(name).to(weight.dtype)))
                    self._merged_norms[name] = norm
                else:
                    weight.add_(self.delta_weight(name).to(weight.dtype))
                self.merged.append(name)

    def unmerge(self) -> None:
        with torch.no_grad():
            weight = self.base_layer.weight
            while self.merged:
                name = self.merged.pop()
                if name in self._merged_norms:
                    scale = (self.lora_magnitude_vector[name].weight / self._merged_norms.pop(name)).to(weight.dtype)
                    weight.copy_(weight / scale[:, None])
                weight.sub_(self.delta_weight(name).to(weight.dtype))


class DoRAHead(DoRALinear, Head):
    """A :class:`DoRALinear` around a linear head, so the model's ``head`` slot still holds a :class:`Head`."""


@register("adapter")
class DoRA(LoRA):
    """Weight-decomposed low-rank adapters on the linear layers named by ``targets``; everything else is frozen.

    The options are LoRA's (see :class:`~lightningllm_plugins.adapter.lora.LoRA`); each targeted layer also
    trains a magnitude vector (out_features,).
    """

    layer_class = DoRALinear
    head_class = DoRAHead
    peft_keys = {**LoRA.peft_keys, "lora_magnitude_vector.{name}.weight": "lora_magnitude_vector"}

    def peft_config(self, layers: dict[str, str]) -> dict:
        """PEFT's ``LoraConfig`` with ``use_dora``."""
        return {**super().peft_config(layers), "use_dora": True}

    def _add_to(self, wrapper: LoRALinear) -> None:
        wrapper.add_dora(self.name, self.rank, self.scaling, self.dropout, self.init)

    def _check_fits(self, name: str, layer: nn.Module) -> None:
        super()._check_fits(name, layer)
        if self.init == "pissa":
            raise ConfigError(
                "DoRA init='pissa' is not supported: PiSSA leaves a residual in the base weight, and DoRA's magnitude "
                "is the norm of that base weight, so the two starts disagree. Use LoRA with init='pissa', or DoRA "
                "with init='kaiming' or 'gaussian'."
            )
        if isinstance(layer, LoRALinear) and not isinstance(layer, DoRALinear):
            raise ConfigError(
                f"{name} already holds LoRA adapters ({', '.join(layer.adapter_names())}) in a plain LoRA layer, "
                "which has no place for a DoRA magnitude. Apply DoRA first and LoRA after it (a DoRA layer holds "
                "both), or target other layers."
            )
