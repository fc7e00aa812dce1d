"""IA3: learned rescaling vectors of keys, values and the FFN hidden (Liu et al., 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning").

Each targeted ``nn.Linear`` is wrapped by an :class:`IA3Linear` that keeps it as ``base_layer`` and holds one
vector per adapter name in ``ia3_l``, as Hugging Face PEFT does: an attention projection's output is
rescaled, ``l * (W x + b)`` (``l``: (out_features, 1)), and a feed-forward layer's input, ``W (l * x) + b``
(``l``: (1, in_features)), which for ``down_proj`` rescales the FFN hidden. The vectors start at one, so a
fresh adapter changes nothing; merging folds them into the weight (and an output-scaled layer's bias).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from lightningllm.adapters import (
    AdapterError,
    AdapterLayer,
    check_adapter_name,
    parameters_of,
    replace_module,
    train_only,
)
from lightningllm.contracts import Adapter, AdapterModule, Head
from lightningllm.errors import ConfigError
from lightningllm.registry import register
from lightningllm_plugins.adapter.lora import _linear_layers, _matches, _shared_parameters

log = logging.getLogger(__name__)


class IA3Vector(nn.Module):
    """One rescaling vector ``weight``: (1, in_features) on the input or (out_features, 1) on the output, ones
    by its own rule (so it stays one when FSDP materialises it from the meta device)."""

    def __init__(self, shape: tuple[int, int], **tensor_kwargs) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape, **tensor_kwargs))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class IA3Linear(AdapterLayer):
    """``y = base_layer(x * l)`` on a feed-forward layer, ``y = base_layer(x) * l`` otherwise, with ``l`` the
    product of the active adapters' vectors.

    Args:
        base_layer: the frozen linear it wraps.
        feedforward: rescale the input (the FFN hidden entering ``down_proj``) rather than the output.
    """

    def __init__(self, base_layer: nn.Linear, feedforward: bool) -> None:
        super().__init__(base_layer)
        self.feedforward = feedforward
        self.ia3_l = nn.ModuleDict()
        self.shared_weight = False

    def add_adapter(self, name: str) -> None:
        """Add adapter ``name`` (a vector of ones) beside the others and make it active."""
        weight = self.base_layer.weight
        shape = (1, self.in_features) if self.feedforward else (self.out_features, 1)
        self.ia3_l[name] = IA3Vector(shape, device=weight.device, dtype=weight.dtype)
        self.active.append(name)

    def adapter_names(self) -> list[str]:
        return list(self.ia3_l)

    def adapter_params(self, name: str) -> list[str]:
        return [f"ia3_l.{name}.weight"]

    def reset_parameters(self) -> None:
        for vector in self.ia3_l.values():
            vector.reset_parameters()

    def scaling(self) -> Tensor | None:
        """The product of the active, unmerged vectors, flattened: (in_features,) or (out_features,); None if none."""
        names = [name for name in self.active if name not in self.merged] if self.enabled else []
        if not names:
            return None
        scaling = self.ia3_l[names[0]].weight.flatten()
        for name in names[1:]:
            scaling = scaling * self.ia3_l[name].weight.flatten()
        return scaling

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """x: (..., in_features) -> (..., out_features); extra arguments go to the base layer."""
        scaling = self.scaling()
        if scaling is None:
            return self.base_layer(x, *args, **kwargs)
        if self.feedforward:
            return self.base_layer(x * scaling, *args, **kwargs)
        return self.base_layer(x, *args, **kwargs) * scaling

    def merge(self) -> None:
        if self.shared_weight:
            raise AdapterError(
                "Cannot merge an IA3 adapter into a layer whose weight is shared with another module (a head tied "
                "to the token embedding): merging would rescale the embedding too. Keep the adapter unmerged, or "
                "target untied layers only."
            )
        with torch.no_grad():
            for name in self.active:
                if name not in self.merged:
                    self._fold(self.ia3_l[name].weight, divide=False)
                    self.merged.append(name)

    def unmerge(self) -> None:
        with torch.no_grad():
            while self.merged:
                self._fold(self.ia3_l[self.merged.pop()].weight, divide=True)

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, adapters={self.adapter_names()}, merged={self.merged}"

    def _fold(self, vector: Tensor, divide: bool) -> None:
        # (1, in) scales the weight's columns, (out, 1) its rows and the bias (the whole output is rescaled)
        weight, bias = self.base_layer.weight, getattr(self.base_layer, "bias", None)
        vector = vector.to(weight.dtype)
        weight.copy_(weight / vector if divide else weight * vector)
        if bias is not None and not self.feedforward:
            bias.copy_(bias / vector.flatten() if divide else bias * vector.flatten())


class IA3Head(IA3Linear, Head):
    """An :class:`IA3Linear` around a linear head, so the model's ``head`` slot still holds a :class:`Head`."""


@register("adapter")
class IA3(Adapter):
    """Learned rescaling vectors on the linear layers named by ``targets``; everything else is frozen.

    Args:
        targets: module-name patterns: a plain name matches the last part of a module's name (``k_proj``), a
            shell glob matches the full name (``blocks.0.*.k_proj``).
        feedforward: the targets whose input is rescaled (by default those named ``down_proj``: the FFN hidden);
            each pattern given must also be in ``targets``. The others have their output rescaled.
        name: the adapter's name; another IA3 with another name adds a second vector to the same layers.
    """

    def __init__(
        self, targets: list[str] | None = None, feedforward: list[str] | None = None, name: str = "default"
    ) -> None:
        targets = list(targets) if targets is not None else ["k_proj", "v_proj", "down_proj"]
        self.config = {"targets": targets, "feedforward": feedforward, "name": name}
        feedforward = list(feedforward) if feedforward is not None else None
        _check_options(targets, feedforward, name)
        self.targets, self.name = targets, name
        self.feedforward = feedforward if feedforward is not None else ["down_proj"]

    peft_keys = {"ia3_l.{name}.weight": "ia3_l"}

    def peft_config(self, layers: dict[str, str]) -> dict:
        """PEFT's ``IA3Config`` of this adapter on the Hugging Face modules ``layers`` names."""
        feedforward = [hf for ours, hf in layers.items() if _matches(ours, self.feedforward)]
        return {
            "peft_type": "IA3", "target_modules": sorted(layers.values()), "feedforward_modules": sorted(feedforward),
            "fan_in_fan_out": False, "init_ia3_weights": True,
        }  # fmt: skip

    def apply(self, model: nn.Module) -> None:
        """Wrap every targeted linear of ``model`` (or add to its wrapper), freeze all but this adapter."""
        layers = self._matching_layers(model)
        shared = _shared_parameters(model)
        wrappers = []
        for name, layer in layers:
            wrapper = layer if isinstance(layer, IA3Linear) else self._wrap(model, name, layer)
            wrapper.shared_weight = id(wrapper.base_layer.weight) in shared
            wrapper.add_adapter(self.name)
            wrappers.append(wrapper)
        trainable = train_only(model, parameters_of(wrappers, self.name))
        log.info("IA3 %r on %d layers: %s", self.name, len(layers), trainable)

    def _wrap(self, model: nn.Module, name: str, layer: nn.Linear) -> IA3Linear:
        wrapper = (IA3Head if isinstance(layer, Head) else IA3Linear)(layer, _matches(name, self.feedforward))
        return replace_module(model, name, wrapper)

    def _matching_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        candidates = _linear_layers(model, AdapterModule)
        found = [(name, layer) for name, layer in candidates if _matches(name, self.targets)]
        if not found:
            names = sorted({name.rsplit(".", 1)[-1] for name, _ in candidates})
            raise ConfigError(
                f"IA3 targets {self.targets} match no linear layer of {type(model).__name__}. Its linear layers are "
                f"named {', '.join(names) or '(none)'}; give plain names (k_proj, v_proj, down_proj) or shell globs "
                "over full module names (blocks.0.*.k_proj)."
            )
        for name, layer in found:
            if isinstance(layer, AdapterModule) and not isinstance(layer, IA3Linear):
                raise ConfigError(
                    f"IA3 cannot target {name}: it already holds {type(layer).__name__} adapters, and an IA3 vector "
                    "around them would rescale their update too. Give IA3 other targets, or apply it first."
                )
            if isinstance(layer, IA3Linear) and self.name in layer.adapter_names():
                raise ConfigError(
                    f"{name} already holds an IA3 adapter named {self.name!r}; give the second IA3 another name "
                    f"(name: ...). It holds: {', '.join(layer.adapter_names())}."
                )
            if isinstance(layer, IA3Linear) and layer.feedforward != _matches(name, self.feedforward):
                raise ConfigError(
                    f"IA3 {self.name!r} treats {name} as {'' if layer.feedforward else 'not '}feed-forward unlike "
                    "the IA3 adapters already on it; adapters on one layer rescale the same side (input or output)."
                )
        return found


def _check_options(targets: list[str], feedforward: list[str] | None, name: str) -> None:
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(
            f"IA3 targets={targets!r} must be a non-empty list of module-name patterns, e.g. "
            "[k_proj, v_proj, down_proj]."
        )
    stray = [f for f in feedforward or [] if f not in targets]
    if stray:
        raise ConfigError(
            f"IA3 feedforward={feedforward!r} names {', '.join(map(repr, stray))}, which is not among the targets "
            f"{targets!r}: the feed-forward layers are the targets whose input is rescaled, so each must be a target."
        )
    check_adapter_name("IA3", name)
