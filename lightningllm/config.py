"""Plugin specs: turning factories into ``{class_path, init_args}`` and back.

The same shape as LightningCLI's YAML, so an exported ``config.yaml`` can be pasted
into a run config, and a model built in Python can be exported and rebuilt.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from lightningllm import registry
from lightningllm.errors import ConfigError


def spec_of(factory: Callable[..., Any]) -> dict[str, Any]:
    """``{class_path, init_args}`` of a plugin class or a partial of one.

    Accepts a class, ``functools.partial(cls, **knobs)`` and the partials jsonargparse
    builds for instance factories. Registered classes are named by their short name.
    """
    if isinstance(factory, type):
        return {"class_path": class_name(factory), "init_args": {}}
    if isinstance(factory, functools.partial):
        candidates = [factory.func, *reversed(factory.args)]
        cls = next((c for c in candidates if isinstance(c, type)), None)
        if cls is not None:
            return {"class_path": class_name(cls), "init_args": dict(factory.keywords)}
    raise ConfigError(
        f"Cannot describe the factory {factory!r} as a config: pass a plugin class or "
        "functools.partial(PluginClass, **knobs)."
    )


def factory_of(spec: dict[str, Any] | str, kind: str) -> Callable[..., Any]:
    """The inverse of :func:`spec_of`: ``partial(cls, **init_args)``."""
    if isinstance(spec, str):
        spec = {"class_path": spec}
    cls = resolve(spec["class_path"], kind)
    return functools.partial(cls, **spec.get("init_args", {}))


def resolve(class_path: str, kind: str) -> type:
    """A registered short name, or a dotted import path to any class."""
    if "." not in class_path:
        return registry.get(kind, class_path)
    module_name, _, attr = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise ConfigError(
            f"Cannot import {kind} class {class_path!r}. Registered {kind} plugins: "
            f"{', '.join(registry.available(kind))}."
        ) from None


def class_name(cls: type) -> str:
    """Short registry name if ``cls`` is registered under it, else the full import path."""
    for kind in registry.KINDS:
        try:
            if registry.get(kind, cls.__name__) is cls:
                return cls.__name__
        except registry.PluginNotFoundError:
            continue
    return f"{cls.__module__}.{cls.__qualname__}"
