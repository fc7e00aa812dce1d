"""LoRA: low-rank updates ``W + (alpha / r) B A`` beside frozen linear layers (Hu et al., 2021).

Each targeted ``nn.Linear`` is wrapped by a :class:`LoRALinear` that keeps it as ``base_layer`` and holds
its adapters by name in ``ModuleDict`` s (``lora_A[name]``, ``lora_B[name]``), as Hugging Face PEFT does,
so several adapters live on one model, switch, merge and save under the same parameter names as PEFT's.
rsLoRA (Kalajdzievski, 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA") scales by
``alpha / sqrt(r)`` instead. PiSSA (Meng et al., 2024, "PiSSA: Principal Singular Values and Singular Vectors
Adaptation of Large Language Models") starts ``A`` and ``B`` from the top-r singular triplets of the base weight
and leaves the residual in the base, so the adapter trains the principal part of the weight.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from typing import Literal

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
from lightningllm.contracts import Adapter, Head
from lightningllm.errors import ConfigError
from lightningllm.registry import register

log = logging.getLogger(__name__)

INITS = ("kaiming", "gaussian", "pissa")
#: the projections every plugin names alike, and the LM head
KNOWN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "head")


class LoRADown(nn.Linear):
    """``A`` (rank, in_features): Kaiming-uniform (PEFT's and the LoRA reference code's default) or Normal(0, 1/r).

    A PiSSA adapter gets its A from the base weight when it is added; materialised from the meta device without
    a weight to decompose, it starts as Kaiming-uniform (B zero: no change)."""

    def __init__(self, in_features: int, rank: int, init: str, **tensor_kwargs) -> None:
        self.init = init
        super().__init__(in_features, rank, bias=False, **tensor_kwargs)

    def reset_parameters(self) -> None:
        if self.init == "gaussian":
            nn.init.normal_(self.weight, std=1.0 / self.out_features)
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))


class LoRAUp(nn.Linear):
    """``B`` (out_features, rank), zero-initialised by its own rule, so a fresh adapter changes nothing, on the
    CPU path and when FSDP materialises it from the meta device."""

    def __init__(self, rank: int, out_features: int, **tensor_kwargs) -> None:
        super().__init__(rank, out_features, bias=False, **tensor_kwargs)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)


class LoRALinear(AdapterLayer):
    """``y = base_layer(x) + sum over active adapters of scaling * B A dropout(x)``.

    Args:
        base_layer: the frozen linear it wraps (its parameters keep their names under ``base_layer.``).
    """

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.shared_weight = False  # the base weight is also another module's (a head tied to the embedding)

    def add_adapter(self, name: str, rank: int, scaling: float, dropout: float, init: str) -> None:
        """Add adapter ``name`` (A, B, dropout, scaling) beside the others and make it active."""
        like = {"device": self.base_layer.weight.device, "dtype": self.base_layer.weight.dtype}
        self.lora_A[name] = LoRADown(self.in_features, rank, init, **like)
        self.lora_B[name] = LoRAUp(rank, self.out_features, **like)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = scaling
        self.active.append(name)
        if init == "pissa":
            self.pissa_init(name)

    def pissa_init(self, name: str) -> None:
        """PiSSA: with ``W = U S V^T`` (out, in), ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T`` and the base
        weight becomes the residual ``W - s B A``, so the layer computes what it did (up to rounding).

        The product ``B A`` does not depend on the signs the SVD picks, so the residual is the same on every
        machine: an adapter-only folder rebuilds it from the base it was trained on.
        """
        weight = self.base_layer.weight
        if weight.is_meta:  # a structural build (estimate, conversion, FSDP): the start weights come later
            return
        if self.shared_weight or not weight.is_floating_point():
            why = "it is shared with another module (a head tied to the token embedding)" if self.shared_weight else (
                f"it is {weight.dtype}, not a float")  # fmt: skip
            raise ConfigError(
                "LoRA init='pissa' replaces the base weight by its residual after the top-r singular values, but "
                f"this layer's weight cannot be rewritten: {why}. Use init='kaiming' here, or target other layers."
            )
        rank, scaling = self.lora_A[name].out_features, self.scaling[name]
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)  # (out, k), (k,), (k, in)
            root = (s[:rank] / scaling).sqrt()  # (r,)
            self.lora_A[name].weight.copy_(root[:, None] * vh[:rank])  # (r, in)
            self.lora_B[name].weight.copy_(u[:, :rank] * root)  # (out, r)
            residual = weight.float() - scaling * self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()
            weight.copy_(residual.to(weight.dtype))

    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def adapter_params(self, name: str) -> list[str]:
        return [f"lora_A.{name}.weight", f"lora_B.{name}.weight"]

    def reset_parameters(self) -> None:
        """Each adapter by its own rule (A random, B zero); the base layer is left alone."""
        for name in self.lora_A:
            self.lora_A[name].reset_parameters()
            self.lora_B[name].reset_parameters()

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """x: (..., in_features) -> (..., out_features); extra arguments go to the base layer (a head's padding)."""
        out = self.base_layer(x, *args, **kwargs)
        if not self.enabled:
            return out
        for name in self.active:
            if name not in self.merged:
                delta = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]
                out = out + delta * self._output_scale()
        return out

    def delta_weight(self, name: str) -> Tensor:
        """scaling * B @ A: (out_features, in_features), the update adapter ``name`` adds to the base weight."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def merge(self) -> None:
        if self.shared_weight:
            raise AdapterError(
                "Cannot merge a LoRA adapter into a layer whose weight is shared with another module (a head tied "
                "to the token embedding): merging would change the embedding too. Keep the adapter unmerged, or "
                "target untied layers only."
            )
        with torch.no_grad():
            for name in self.active:
                if name not in self.merged:
                    self.base_layer.weight.add_(self.delta_weight(name).to(self.base_layer.weight.dtype))
                    self.merged.append(name)

    def unmerge(self) -> None:
        with torch.no_grad():
            while self.merged:
                self.base_layer.weight.sub_(self.delta_weight(self.merged.pop()).to(self.base_layer.weight.dtype))

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self.active}, merged={self.merged}"

    def _output_scale(self) -> float:
        # a head scales its whole output (LMHead's logit_scale), so the update of its weight is scaled alike
        return getattr(self.base_layer, "logit_scale", 1.0)


class LoRAHead(LoRALinear, Head):
    """A :class:`LoRALinear` around a linear head, so the model's ``head`` slot still holds a :class:`Head`."""


@register("adapter")
class LoRA(Adapter):
    """Low-rank adapters on the linear layers named by ``targets``; everything else is frozen.

    Args:
        rank: r, the rank of each update (1..min(in_features, out_features) of every target).
        alpha: the update is scaled by alpha / r (alpha / sqrt(r) with ``rslora``).
        targets: module-name patterns: a plain name matches the last part of a module's name (``q_proj``,
            ``head``), a shell glob matches the full name (``blocks.0.*.q_proj``).
        dropout: dropout on the adapter's input.
        rslora: scale by alpha / sqrt(r) (rank-stabilised LoRA).
        init: ``kaiming`` (uniform A) or ``gaussian`` (A ~ Normal(0, 1/r)), B zero; or ``pissa``: A and B from the
            top-r singular vectors and values of the base weight, which keeps the residual (PEFT's
            ``init_lora_weights="pissa"``). With PiSSA, disabling the adapter leaves the residual model, not the
            base, and the export holds the residual base weights.
        name: the adapter's name; another LoRA with another name adds a second adapter to the same layers.
    """

    #: the wrappers this adapter puts around a plain linear and a linear head (a subclass may bring its own)
    layer_class: type[LoRALinear] = LoRALinear
    head_class: type[LoRALinear] = LoRAHead
    peft_keys = {"lora_A.{name}.weight": "lora_A.weight", "lora_B.{name}.weight": "lora_B.weight"}

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        targets: list[str] | None = None,
        dropout: float = 0.0,
        rslora: bool = False,
        init: Literal["kaiming", "gaussian", "pissa"] = "kaiming",
        name: str = "default",
    ) -> None:
        targets = list(targets) if targets is not None else ["q_proj", "v_proj"]
        _check_options(rank, alpha, targets, dropout, init, name, type(self).__name__)
        self.rank, self.alpha, self.targets, self.dropout = rank, alpha, targets, dropout
        self.rslora, self.init, self.name = rslora, init, name
        self.config = {"rank": rank, "alpha": alpha, "targets": targets, "dropout": dropout, "rslora": rslora,
                       "init": init, "name": name}  # fmt: skip

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rslora."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def peft_config(self, layers: dict[str, str]) -> dict:
        """PEFT's ``LoraConfig`` of this adapter on the Hugging Face modules ``layers`` names."""
        if self.init == "pissa":
            raise ConfigError(
                "A LoRA with init='pissa' has changed its base weights (they hold the residual), so its A and B alone "
                "do not adapt the original Hugging Face model. Merge it (lightningllm.adapters.merge_and_unload) and "
                "convert the whole model with to_hf instead."
            )
        return {"peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "use_rslora": self.rslora, "use_dora": False, "init_lora_weights": True, "bias": "none",
                "fan_in_fan_out": False, "target_modules": sorted(layers.values())}  # fmt: skip

    def apply(self, model: nn.Module) -> None:
        """Wrap every targeted linear of ``model`` (or add to its wrapper), freeze all but this adapter."""
        layers = self._matching_layers(model)
        for name, layer in layers:
            self._check_fits(name, layer)
        shared = _shared_parameters(model)
        wrappers = []
        for name, layer in layers:
            wrapper = layer if isinstance(layer, LoRALinear) else self._wrap(model, name, layer)
            wrapper.shared_weight = id(wrapper.base_layer.weight) in shared
            self._add_to(wrapper)
            wrappers.append(wrapper)
        log.info("%s %r (rank %d, alpha %g) on %d layers: %s", type(self).__name__, self.name, self.rank, self.alpha,
                 len(layers), train_only(model, parameters_of(wrappers, self.name)))  # fmt: skip

    def _wrap(self, model: nn.Module, name: str, layer: nn.Linear) -> LoRALinear:
        return replace_module(model, name, (self.head_class if isinstance(layer, Head) else self.layer_class)(layer))

    def _add_to(self, wrapper: LoRALinear) -> None:
        wrapper.add_adapter(self.name, self.rank, self.scaling, self.dropout, self.init)

    def _matching_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        candidates = _linear_layers(model)
        found = [(name, layer) for name, layer in candidates if _matches(name, self.targets)]
        if not found:
            names = sorted({name.rsplit(".", 1)[-1] for name, _ in candidates})
            raise ConfigError(
                f"{type(self).__name__} targets {self.targets} match no linear layer of {type(model).__name__}. Its "
                f"linear layers are named {', '.join(names) or '(none)'}; give plain names (q_proj, v_proj, head) or "
                "shell globs over full module names (blocks.0.*.q_proj)."
            )
        return found

    def _check_fits(self, name: str, layer: nn.Module) -> None:
        width = min(layer.in_features, layer.out_features)
        if self.rank > width:
            raise ConfigError(
                f"{type(self).__name__} rank {self.rank} is above the width of {name} ({layer.in_features} -> "
                f"{layer.out_features}): a rank-r update of that layer needs 1 <= r <= {width}."
            )
        if isinstance(layer, LoRALinear) and self.name in layer.adapter_names():
            raise ConfigError(
                f"{name} already holds a LoRA adapter named {self.name!r}; give the second {type(self).__name__} "
                f"another name (name: ...), as names tell adapters apart. It holds: {', '.join(layer.adapter_names())}."
            )


def _check_options(
    rank: int, alpha: float, targets: list[str], dropout: float, init: str, name: str, kind: str = "LoRA"
) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ConfigError(f"{kind} rank={rank!r} is not a positive integer: give the rank of the update, e.g. 8.")
    if not alpha > 0:
        raise ConfigError(f"{kind} alpha={alpha!r} must be positive: the update is scaled by alpha / rank (e.g. 16).")
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(
            f"{kind} targets={targets!r} must be a non-empty list of module-name patterns, e.g. "
            f"[q_proj, v_proj]; the shared names are {', '.join(KNOWN_TARGETS)}."
        )
    if not 0 <= dropout < 1:
        raise ConfigError(f"{kind} dropout={dropout!r} must be in [0, 1).")
    if init not in INITS:
        raise ConfigError(f"{kind} init={init!r} is not an initialisation: choose one of {', '.join(INITS)}.")
    check_adapter_name(kind, name)


def _linear_layers(model: nn.Module, wrapper: type[nn.Module] | None = None) -> list[tuple[str, nn.Module]]:
    """The model's own linears and the adapter wrappers of type ``wrapper`` (default: LoRA's), not the linears
    inside such a wrapper."""
    wrapper = wrapper or LoRALinear
    found, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, wrapper) and name:
            found.append((name, module))
            inside.append(f"{name}.")
        elif isinstance(module, nn.Linear) and name:
            found.append((name, module))
    return found


def _matches(name: str, patterns: list[str]) -> bool:
    name = name.removesuffix(".base_layer")  # a layer another adapter wraps (a bottleneck) keeps its name
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(last, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that more than one module holds (a head tied to the embedding)."""
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}
