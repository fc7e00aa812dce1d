"""Bottleneck adapters: ``h + W_up act(W_down h)`` on a sub-layer's output (Houlsby et al., 2019).

"Parameter-Efficient Transfer Learning for NLP" (Houlsby et al., 2019) puts one adapter after the attention
output projection and one after the feed-forward, before each residual add; "AdapterFusion" (Pfeiffer et al.,
2021) keeps only the one after the feed-forward. Each targeted projection (an attention's ``o_proj``, a
feed-forward's ``down_proj``) is wrapped by a :class:`BottleneckLinear` that keeps it as ``base_layer`` and holds
its adapters by name in ``ModuleDict`` s, like LoRA. ``W_up`` starts at zero, so a fresh adapter changes nothing.
The nonlinearity between the projections means an adapter cannot fold into a linear weight: merging is refused.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

from torch import Tensor, nn

from lightningllm.adapters import (
    AdapterError,
    AdapterLayer,
    check_adapter_name,
    parameters_of,
    replace_module,
    train_only,
)
from lightningllm.contracts import Adapter, Block
from lightningllm.errors import ConfigError
from lightningllm.registry import register
from lightningllm_plugins.ffn.mlp import ACTIVATIONS

log = logging.getLogger(__name__)

#: (block child, projection) pairs each placement adapts
PLACEMENTS = {
    "houlsby": (("attention", "o_proj"), ("cross_attention", "o_proj"), ("ffn", "down_proj")),
    "pfeiffer": (("ffn", "down_proj"),),
}


class BottleneckDown(nn.Linear):
    """``W_down`` (width, dim) with bias: Kaiming-uniform, as ``nn.Linear`` (and LoRA's A) start; bias zero."""

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.zeros_(self.bias)


class BottleneckUp(nn.Linear):
    """``W_up`` (dim, width) with bias, zero-initialised by its own rule, so a fresh adapter adds nothing (on the
    CPU path and when FSDP materialises it from the meta device)."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class BottleneckLinear(AdapterLayer):
    """``h = base_layer(x)``, then ``h = h + up(act(down(h)))`` for each active adapter in turn.

    Several adapters compose in sequence (AdapterHub's ``Stack``), in the order they were added.

    Args:
        base_layer: the frozen projection it wraps (any module mapping (..., in) -> (..., dim): a plain
            ``nn.Linear``, or a LoRA layer, so LoRA on the same projection adapts ``h`` before the bottleneck).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()

    def add_adapter(self, name: str, width: int, activation: str) -> None:
        """Add adapter ``name`` (down to ``width``, ``activation``, up) beside the others and make it active."""
        weight = next(self.base_layer.parameters())
        like = {"device": weight.device, "dtype": weight.dtype}
        self.adapter_down[name] = BottleneckDown(self.out_features, width, **like)
        self.adapter_up[name] = BottleneckUp(width, self.out_features, **like)
        self.adapter_act[name] = ACTIVATIONS[activation]()
        self.active.append(name)

    def adapter_names(self) -> list[str]:
        return list(self.adapter_down)

    def adapter_params(self, name: str) -> list[str]:
        return [f"adapter_down.{name}.weight", f"adapter_down.{name}.bias", f"adapter_up.{name}.weight",
                f"adapter_up.{name}.bias"]  # fmt: skip

    def reset_parameters(self) -> None:
        """Each adapter by its own rule (down random, up zero); the base layer is left alone."""
        for name in self.adapter_down:
            self.adapter_down[name].reset_parameters()
            self.adapter_up[name].reset_parameters()

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        h = self.base_layer(x, *args, **kwargs)
        if not self.enabled:
            return h
        for name in self.active:
            h = h + self.adapter_up[name](self.adapter_act[name](self.adapter_down[name](h)))
        return h

    def merge(self) -> None:
        if self.active:
            raise AdapterError(
                f"Cannot merge the bottleneck adapter(s) {', '.join(map(repr, self.active))}: h + W_up act(W_down h) "
                "has a nonlinearity between its projections, so it is no linear map and cannot fold into the base "
                "weights. Keep the adapters unmerged (or disable them with lightningllm.adapters.disabled)."
            )

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self.active}"


@register("adapter")
class Bottleneck(Adapter):
    """Bottleneck adapters after the attention output and the feed-forward of every block; the rest is frozen.

    Args:
        reduction_factor: the bottleneck is ``dim // reduction_factor`` wide (1..dim).
        placement: ``houlsby`` (after each attention's ``o_proj`` and each feed-forward's ``down_proj``) or
            ``pfeiffer`` (after the feed-forward's ``down_proj`` only).
        activation: the nonlinearity between the projections: ``relu``, ``gelu``, ``gelu_tanh`` or ``silu``.
        name: the adapter's name; another Bottleneck with another name stacks a second adapter after the first.
    """

    def __init__(
        self,
        reduction_factor: int = 16,
        placement: Literal["houlsby", "pfeiffer"] = "houlsby",
        activation: Literal["relu", "gelu", "gelu_tanh", "silu"] = "relu",
        name: str = "default",
    ) -> None:
        _check_options(reduction_factor, placement, activation, name)
        self.reduction_factor, self.placement, self.activation, self.name = (
            reduction_factor, placement, activation, name
        )  # fmt: skip
        self.config = {"reduction_factor": reduction_factor, "placement": placement, "activation": activation,
                       "name": name}  # fmt: skip

    def apply(self, model: nn.Module) -> None:
        """Wrap the targeted projections of every block (or add to their wrappers), freeze all but this adapter."""
        targets = self._targets(model)
        widths = {name: self._width(name, layer) for name, layer in targets}
        wrappers = []
        for name, layer in targets:
            is_wrapper = isinstance(layer, BottleneckLinear)
            wrapper = layer if is_wrapper else replace_module(model, name, BottleneckLinear(layer))
            wrapper.add_adapter(self.name, widths[name], self.activation)
            wrappers.append(wrapper)
        trainable = train_only(model, parameters_of(wrappers, self.name))
        log.info("Bottleneck %r (%s, reduction factor %d) on %d layers: %s", self.name, self.placement,
                 self.reduction_factor, len(targets), trainable)  # fmt: skip

    def _targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        blocks = [(name, module) for name, module in model.named_modules() if isinstance(module, Block)]
        found = []
        for block_name, block in blocks:
            for child, projection in PLACEMENTS[self.placement]:
                sublayer = getattr(block, child, None)
                if sublayer is None:
                    continue
                layer = getattr(sublayer, projection, None)
                if layer is None:
                    raise ConfigError(
                        f"Bottleneck adapters ({self.placement}) go after {child}.{projection}, but {block_name}."
                        f"{child} ({type(sublayer).__name__}) has no {projection} of its own (a mixture of experts "
                        "has one per expert, and an adapter after each expert is not one after the sub-layer). "
                        + ("Use a feed-forward with one down_proj (MLP, SwiGLU), or LoRA on the experts' projections."
                           if child == "ffn" else "Use placement: pfeiffer (after the feed-forward only).")
                    )  # fmt: skip
                found.append((f"{block_name}.{child}.{projection}", layer))
        if not found:
            raise ConfigError(
                f"Bottleneck adapters need transformer blocks (attention o_proj, feed-forward down_proj), and "
                f"{type(model).__name__} has none; use an adapter method that targets its layers by name (LoRA)."
            )
        return found

    def _width(self, name: str, layer: nn.Module) -> int:
        dim = layer.out_features
        if self.reduction_factor > dim:
            raise ConfigError(
                f"Bottleneck reduction_factor {self.reduction_factor} is above the width of {name} ({dim}): the "
                f"bottleneck is dim // reduction_factor wide, so it needs 1 <= reduction_factor <= {dim}."
            )
        if isinstance(layer, BottleneckLinear) and self.name in layer.adapter_names():
            raise ConfigError(
                f"{name} already holds a bottleneck adapter named {self.name!r}; give the second Bottleneck another "
                f"name (name: ...), as names tell adapters apart. It holds: {', '.join(layer.adapter_names())}."
            )
        return dim // self.reduction_factor


def _check_options(reduction_factor: int, placement: str, activation: str, name: str) -> None:
    if not isinstance(reduction_factor, int) or isinstance(reduction_factor, bool) or reduction_factor <= 0:
        raise ConfigError(
            f"Bottleneck reduction_factor={reduction_factor!r} is not a positive integer: the bottleneck is "
            "dim // reduction_factor wide (e.g. 16)."
        )
    if placement not in PLACEMENTS:
        raise ConfigError(
            f"Bottleneck placement={placement!r} is not a placement: choose houlsby (after the attention and the "
            "feed-forward) or pfeiffer (after the feed-forward only)."
        )
    if activation not in ACTIVATIONS:
        raise ConfigError(
            f"Bottleneck activation={activation!r} is not an activation: choose one of {', '.join(ACTIVATIONS)}."
        )
    check_adapter_name("Bottleneck", name)
