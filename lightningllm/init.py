"""Initialisation per module: the rule is fixed on each module when the model is built, then applied module by module.

A model decides once, at build time, how each of its ``nn.Linear`` and ``nn.Embedding`` modules starts:
Normal(0, ``init_std``), residual output projections (``o_proj``, ``down_proj``) at
``init_std / sqrt(2 * n_layers)`` (GPT-2, Radford et al., 2019, section 2.3). :func:`record_normal_init`
writes that std on the module itself. :func:`initialize` then gives every module its own rule: the
recorded normal for those, ``reset_parameters()`` for every other module (children before parents, so
a plugin may refine its children, as a mixture-of-experts layer does for its router).

Modules that a transform adds later (an adapter's zero-initialised ``B``) carry no recorded std and
keep their own ``reset_parameters()``: nothing re-initialises a model by name, on the CPU path or
when FSDP materialises a meta-device model (:func:`lightningllm.strategies.materialize_unit`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

#: attribute holding the std a model recorded on one of its linears or embeddings
INIT_STD = "_lightningllm_init_std"
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


def record_normal_init(root: nn.Module, init_std: float, n_layers: int) -> None:
    """Record Normal(0, std) on every linear and embedding of ``root`` that has no rule yet.

    Residual output projections get ``init_std / sqrt(2 * n_layers)``. Modules recorded by an inner
    model (an encoder given to an encoder-decoder) keep their rule.
    """
    residual_std = init_std / math.sqrt(2 * n_layers)
    for name, module in root.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and not hasattr(module, INIT_STD):
            residual = name.rsplit(".", 1)[-1] in RESIDUAL_OUTPUTS
            setattr(module, INIT_STD, residual_std if residual else init_std)


def initialize(modules: Iterable[nn.Module]) -> None:
    """Each module's own rule: recorded linears and embeddings first, then the others children-first.

    Args:
        modules: the modules to initialise, parents before children (``root.modules()`` order); each
            one's own parameters only are touched by the default rule, a ``reset_parameters()`` may
            refine its children.
    """
    modules = list(modules)
    with torch.no_grad():
        for module in modules:
            std = getattr(module, INIT_STD, None)
            if std is not None:
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for module in reversed(modules):  # children before parents: a parent's rule may refine its children
            if hasattr(module, INIT_STD):
                continue
            own = getattr(module, "reset_own_parameters", None)  # models: only their direct parameters
            if callable(own):
                own()
            elif callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
