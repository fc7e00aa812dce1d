"""Parameters by component, read off the built model (any plugins, tied weights counted once)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lightningllm.contracts import Attention, FeedForward, Head, Norm, Position

COMPONENTS = ("embeddings", "attention", "ffn", "norms", "head", "other")
NORM_TYPES = (Norm, nn.LayerNorm, nn.RMSNorm)


@dataclass
class ParameterCount:
    """Parameter counts of one model.

    Attributes:
        by_component: parameters per entry of :data:`COMPONENTS`; they partition the model's
            unique parameters, so they add up to ``total``.
        total: unique parameters of the model (``sum(p.numel() for p in model.parameters())``).
        active: parameters one token passes through: a mixture-of-experts layer counts its router and
            ``top_k`` of its ``n_experts`` experts.
        lookup: parameters only ever read by a table lookup (untied embeddings), which cost no FLOPs.
    """

    by_component: dict[str, int] = field(default_factory=dict)
    total: int = 0
    active: int = 0
    lookup: int = 0


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count ``model``'s parameters by component; works on the meta device (no memory needed)."""
    owner = _component_of_each_parameter(model)
    counts = ParameterCount(by_component=dict.fromkeys(COMPONENTS, 0))
    for parameter, component in owner.values():
        counts.by_component[component] += parameter.numel()
    counts.total = sum(counts.by_component.values())
    counts.active = counts.total - _inactive_expert_parameters(model)
    head_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    counts.lookup = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding) and id(m.weight) not in head_weights
    )
    return counts


def _component_of_each_parameter(model: nn.Module) -> dict[int, tuple[nn.Parameter, str]]:
    """id(parameter) -> (parameter, component), the first owner in module order winning (tied weights once)."""
    owner: dict[int, tuple[nn.Parameter, str]] = {}
    for name, module in model.named_modules():
        component = _component(name, module)
        if component is None:
            continue
        for parameter in module.parameters():
            owner.setdefault(id(parameter), (parameter, component))
    for parameter in model.parameters():  # parameters directly on unclassified modules
        owner.setdefault(id(parameter), (parameter, "other"))
    return owner


def _component(name: str, module: nn.Module) -> str | None:
    if isinstance(module, Head):
        return "head"
    if isinstance(module, (nn.Embedding, Position)):
        return "embeddings"
    if isinstance(module, Attention):
        return "attention"
    if isinstance(module, FeedForward):
        return "ffn"
    if isinstance(module, NORM_TYPES):
        return "norms"
    return None


def _inactive_expert_parameters(model: nn.Module) -> int:
    """Expert parameters a token skips: ``(1 - top_k / n_experts)`` of every mixture-of-experts layer's experts."""
    inactive = 0
    for module in model.modules():
        experts, top_k = getattr(module, "experts", None), getattr(module, "top_k", None)
        if isinstance(experts, nn.ModuleList) and isinstance(top_k, int) and len(experts):
            expert_parameters = sum(p.numel() for p in experts.parameters())
            inactive += expert_parameters - expert_parameters * top_k // len(experts)
    return inactive
