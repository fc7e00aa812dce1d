"""The model lifecycle every lightningllm model follows: build, head, initialise, start weights, transforms.

Each model's ``__init__`` builds its backbone, then calls :meth:`ModelLifecycle.build_head` and
:meth:`ModelLifecycle.finish_build`, which

1. records each linear's and embedding's initialisation on the module and initialises every module
   by its own rule (:mod:`lightningllm.init`);
2. loads the start weights, when given (:mod:`lightningllm.start_weights`: an export folder or a
   Hugging Face folder); a head the start weights lack stays freshly initialised, and the log says so;
3. applies the transforms in order (freezing, adapters, quantisation) and records them in ``config``.

``config`` records the head and the transforms (not the start weights: an export holds the weights
itself), so ``from_config`` rebuilds the same module tree and ``export`` -> ``load`` reproduces it.
Under FSDP the model is built on the meta device: steps 1 and 3 are structural, and the start weights
replace the meta tensors they cover, so FSDP materialises only what is new (the head, an adapter)
with each module's own rule.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from lightningllm import registry
from lightningllm.config import class_name, factory_of, resolve, spec_of
from lightningllm.contracts import AdapterModule, Head, HeadFactory, NormFactory, Transform
from lightningllm.errors import ConfigError
from lightningllm.init import initialize, record_normal_init
from lightningllm.transforms import Freeze

__all__ = ["Freeze", "ModelLifecycle", "build_transform", "lifecycle_kwargs"]  # Freeze: the built-in transform

log = logging.getLogger(__name__)


class ModelLifecycle:
    """Mixin of every lightningllm model: the ``head`` slot, start weights and transforms.

    The model sets ``self.config``, ``self.dim``, ``self.vocab_size``, ``self.init_std`` and
    ``self.n_layers`` before calling these.
    """

    #: registered head a model gets when its config names none
    default_head = "LMHead"
    #: {name prefix in exports written before the head slot: its name now}; loading renames them
    renamed_weights: dict[str, str] = {"lm_head.": "head."}

    def build_head(
        self, head: HeadFactory | None, *, norm: NormFactory, embedding: nn.Embedding | None, logit_scale: float
    ) -> None:
        """Build ``self.head`` from its factory (None: :attr:`default_head`) and record it in ``config``."""
        factory = head if head is not None else factory_of(self.default_head, "head")
        self._head_structure = {"norm": norm, "embedding": embedding, "logit_scale": logit_scale}
        self.head = self._make_head(factory)
        self.config["head"] = spec_of(factory)

    def replace_head(self, head: HeadFactory, reason: str) -> Head:
        """Swap in a freshly initialised head and log it, e.g. when a task needs class logits instead of tokens.

        Args:
            head: factory of the new head (``partial(ClassificationHead, n_classes=3)``).
            reason: who replaces it and why, for the log.
        """
        old = type(self.head).__name__
        like = next(self.parameters())
        with torch.device(like.device):  # beside the model (the meta device too, for FSDP to materialise)
            self.head = self._make_head(head).to(dtype=like.dtype)
        record_normal_init(self.head, self.init_std, self.n_layers)
        initialize(self.head.modules())
        self.config["head"] = spec_of(head)
        log.info("%s: replaced the %s head by a new %s (%s).", type(self).__name__, old, type(self.head).__name__,
                 reason)  # fmt: skip
        return self.head

    def finish_build(self, start_weights: str | os.PathLike | None, transforms: list[Transform] | None) -> None:
        """Initialise, load the start weights, apply the transforms (the order of the lifecycle)."""
        self.record_init()
        self.reset_parameters()
        self.config["transforms"] = []
        new_head = False
        if start_weights is not None:
            from lightningllm.start_weights import load_start_weights

            new_head = load_start_weights(self, start_weights)
        for transform in transforms or []:
            self.apply_transform(transform)
        if new_head and transforms:
            self._train_new_head()

    def _train_new_head(self) -> None:
        """Leave a head the start weights lacked trainable whatever the transforms froze: random weights that never
        train make a random classifier (PEFT's ``modules_to_save``). A head an adapter wraps, or one that shares its
        weight with the embedding, is left as the transforms set it."""
        shared = {id(p) for name, p in self.named_parameters() if not name.startswith("head.")}
        params = list(self.head.parameters())
        if isinstance(self.head, AdapterModule) or any(id(p) in shared for p in params):
            return
        if not all(p.requires_grad for p in params):
            log.info("%s: the new %s head trains (the start weights lack it).", type(self).__name__,
                     type(self.head).__name__)  # fmt: skip
        for param in params:
            param.requires_grad_(True)

    def apply_transform(self, transform: Transform) -> None:
        """Apply ``transform`` to this model and record it in ``config``."""
        if not isinstance(transform, Transform):
            raise ConfigError(
                f"{type(self).__name__} got the transform {transform!r}, which is not a lightningllm Transform: give "
                "objects with apply(model) and a config dict, e.g. {class_path: Freeze, init_args: {train: head}}."
            )
        transform.apply(self)
        self.config["transforms"].append({"class_path": class_name(type(transform)), "init_args": transform.config})

    def record_init(self) -> None:
        """Record the build-time initialisation of every linear and embedding (see :mod:`lightningllm.init`)."""
        record_normal_init(self, self.init_std, self.n_layers)

    def reset_parameters(self) -> None:
        """Initialise every module of the model by its own rule (e.g. after ``to_empty`` on a meta model)."""
        initialize(self.modules())

    def reset_own_parameters(self) -> None:
        """The model's direct parameters (none here; a latent array in the Perceiver)."""

    def _make_head(self, factory: HeadFactory) -> Head:
        return factory(dim=self.dim, vocab_size=self.vocab_size, **self._head_structure)


def lifecycle_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """``head`` and ``transforms`` of a model config as constructor arguments (the rest is the model's)."""
    kwargs = {}
    if config.get("head") is not None:
        kwargs["head"] = factory_of(config["head"], "head")
    kwargs["transforms"] = [build_transform(spec) for spec in config.get("transforms") or []]
    return kwargs


def build_transform(spec: dict[str, Any]) -> Transform:
    """A transform from its ``{class_path, init_args}``: a registered transform, a registered adapter (an
    adapter is a transform), or a class by its import path."""
    class_path = spec["class_path"]
    kind = "adapter" if "." not in class_path and class_path in registry.available("adapter") else "transform"
    return resolve(class_path, kind)(**(spec.get("init_args") or {}))
