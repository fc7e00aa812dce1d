"""Freezing policies: which parameters of a model train, recorded in its config as a transform."""

from __future__ import annotations

import fnmatch
import logging
from typing import Literal

from torch import nn

from lightningllm.contracts import Transform
from lightningllm.errors import ConfigError
from lightningllm.registry import register
from lightningllm.strategies import block_units

log = logging.getLogger(__name__)

TRAIN = ("all", "head", "last_blocks", "matching")


@register("transform")
class Freeze(Transform):
    """Freeze every parameter except the chosen ones (``requires_grad=False``; the optimizer skips them).

    Policies (``train``):

    - ``all``: everything trains (full fine-tuning; the default).
    - ``head``: the head only (a linear probe on a frozen backbone).
    - ``last_blocks``: the last ``n_blocks`` blocks, the final norm and the head (Howard & Ruder, 2018,
      "ULMFiT", on gradual unfreezing of the top layers).
    - ``matching``: the parameters whose names match one of ``patterns`` (shell globs over
      ``model.named_parameters()``, e.g. ``"blocks.*.norm_*"``, ``"head.*"``).

    A weight shared by two names (a head tied to the embedding) trains when either name is chosen.

    Args:
        train: the policy.
        n_blocks: blocks that train with ``last_blocks``.
        patterns: the globs of ``matching``.
    """

    def __init__(
        self,
        train: Literal["all", "head", "last_blocks", "matching"] = "all",
        n_blocks: int = 1,
        patterns: list[str] | None = None,
    ) -> None:
        if train not in TRAIN:
            raise ConfigError(f"Freeze train={train!r} is not a policy: choose one of {', '.join(TRAIN)}.")
        if train == "matching" and not patterns:
            raise ConfigError("Freeze train='matching' needs patterns: globs over parameter names, e.g. ['head.*'].")
        self.train, self.n_blocks, self.patterns = train, n_blocks, list(patterns or [])
        self.config = {"train": train, "n_blocks": n_blocks, "patterns": self.patterns}

    def apply(self, model: nn.Module) -> None:
        """Set ``requires_grad`` on every parameter of ``model`` by the policy."""
        prefixes = self._trainable_prefixes(model)
        chosen: set[int] = set()
        for name, param in model.named_parameters(remove_duplicate=False):
            if self._chosen(name, prefixes):
                chosen.add(id(param))
        if not chosen:
            raise ConfigError(
                f"Freeze(train={self.train!r}, patterns={self.patterns}) leaves no parameter of {type(model).__name__} "
                "trainable, so training would change nothing. Choose parameters that exist (a model with NoHead has "
                "no head to train)."
            )
        total = trainable = 0
        for param in model.parameters():
            param.requires_grad_(id(param) in chosen)
            total += param.numel()
            trainable += param.numel() if id(param) in chosen else 0
        log.info("Freeze(train=%s): %d of %d parameters train", self.train, trainable, total)

    def _trainable_prefixes(self, model: nn.Module) -> list[str]:
        if self.train != "last_blocks":
            return ["head."]
        units = block_units(model)
        if not isinstance(self.n_blocks, int) or not 1 <= self.n_blocks <= len(units):
            raise ConfigError(
                f"Freeze n_blocks={self.n_blocks!r} with train='last_blocks', but {type(model).__name__} has "
                f"{len(units)} blocks: give 1..{len(units)}."
            )
        names = {id(module): name for name, module in model.named_modules()}
        keep = [*units[-self.n_blocks :], model.output_norm]
        return ["head.", *(f"{names[id(module)]}." for module in keep)]

    def _chosen(self, name: str, prefixes: list[str]) -> bool:
        if self.train == "all":
            return True
        if self.train == "matching":
            return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.patterns)
        return any(name.startswith(prefix) for prefix in prefixes)
