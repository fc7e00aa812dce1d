"""Checks of option values that would otherwise reach torch or the optimizer unchecked.

Shared by the models, the tasks and the data modules, so every bad value gets the same kind of
paragraph: the owner, the option, the value and what is allowed (a :class:`ConfigError`, exit 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lightningllm.errors import ConfigError


def check_int(owner: str, name: str, value: Any, minimum: int | None = None, extra: str = "") -> None:
    """``value`` is an integer (not a bool) and at least ``minimum``; ``extra`` adds the other allowed values."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        allowed = "an integer" if minimum is None else f"an integer >= {minimum}"
        _refuse(owner, name, value, f"{allowed}{extra and ' '}{extra}")


def check_number(
    owner: str,
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    high_open: bool = False,
    extra: str = "",
) -> None:
    """``value`` is a finite (or infinite, where the range allows) real number in ``[low, high]`` (``high`` excluded
    when ``high_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and low <= value and (value < high if high_open else value <= high)
    if not ok:
        _refuse(owner, name, value, f"a number in {_interval(low, high, high_open)}{extra and ' '}{extra}")


def check_probability(owner: str, name: str, value: Any) -> None:
    """A dropout probability: in ``[0, 1)`` (1 would zero every activation)."""
    check_number(owner, name, value, 0.0, 1.0, high_open=True, extra="(the probability of zeroing an activation)")


def build_optimizer(owner: str, optimizer: Callable, params: Any):
    """``optimizer(params)``, with a bad value (negative lr, betas >= 1) refused as one paragraph before any step.

    torch's own message names the option and the value; this adds what is allowed and where to set it.
    The user's factory is called once, on the real parameters (a factory may record what it builds).
    """
    try:
        return optimizer(params)
    except ValueError as err:
        raise ConfigError(
            f"{owner}'s optimizer refuses its options: {err}. Learning rate, epsilon and weight decay must be "
            ">= 0 and each beta in [0, 1); set them under model.optimizer.init_args (e.g. --model.optimizer.lr=3e-4)."
        ) from None


def _interval(low: float, high: float, high_open: bool) -> str:
    left = "(-inf" if low == -math.inf else f"[{low:g}"
    right = "inf)" if high == math.inf else f"{high:g}{')' if high_open else ']'}"
    return f"{left}, {right}"


def _refuse(owner: str, name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{owner} {name}={value!r} is not allowed: {name} must be {allowed}.")
