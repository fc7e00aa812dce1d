"""Estimates of models too deep to build, even on the meta device, from two shallow builds.

On ``meta`` a layer costs no tensor memory but still a few kilobytes of Python objects, so
``n_layers=1000000000`` cannot be built at all. Every number :func:`~lightningllm.estimate.estimate`
reports (parameters, FLOPs, KV cache, each part of the training memory) is an affine function of a
layer count when the layers are alike: ``f(L) = f(1) + (L - 1) (f(2) - f(1))``. The command builds the
model with 1 layer and with 2 and extends that line to the configured count.
"""

from __future__ import annotations

import dataclasses
from typing import Any

#: Deeper stacks are estimated from 1- and 2-layer builds instead of being built.
MAX_BUILT_LAYERS = 256


def extrapolate(base: Any, steps: list[tuple[int, Any]]) -> Any:
    """``base`` (everything at 1 layer) plus, per layer count, ``(count - 1)`` times its one-layer difference.

    Args:
        base: an estimate (a dataclass, dict or number) with every deep stack built at 1 layer.
        steps: (configured layer count, the same estimate with that one stack built at 2 layers).
    """
    if isinstance(base, bool) or not isinstance(base, (int, float, dict)) and not dataclasses.is_dataclass(base):
        return base
    if isinstance(base, (int, float)):
        value = base + sum((count - 1) * (other - base) for count, other in steps)
        return type(base)(value)
    if isinstance(base, dict):
        return {key: extrapolate(value, [(c, other[key]) for c, other in steps]) for key, value in base.items()}
    changes = {
        f.name: extrapolate(getattr(base, f.name), [(c, getattr(other, f.name)) for c, other in steps])
        for f in dataclasses.fields(base)
        if f.init
    }
    return dataclasses.replace(base, **changes)
