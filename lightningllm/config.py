"""Plugin specs: turning factories into ``{class_path, init_args}`` and back.

The same shape as LightningCLI's YAML, so an exported ``config.yaml`` can be pasted
into a run config, and a model built in Python can be exported and rebuilt.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from lightningllm import registry
from lightningllm.errors import ConfigError, UnsafeConfigError


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
    """A registered short name, or a dotted import path to a class (see :func:`import_class`)."""
    if "." not in class_path:
        return registry.get(kind, class_path)
    try:
        return import_class(class_path, f"{kind} plugin")
    except (ImportError, AttributeError):
        raise ConfigError(
            f"Cannot import {kind} class {class_path!r}. Registered {kind} plugins: "
            f"{', '.join(registry.available(kind))}."
        ) from None


_trust: ContextVar[tuple[bool, str]] = ContextVar("lightningllm_trust_code", default=(True, ""))


@contextmanager
def code_trust(trusted: bool, source: str) -> Iterator[None]:
    """Within the block, :func:`import_class` imports only lightningllm's and registered plugins' modules
    unless ``trusted``.

    Args:
        trusted: the caller vouches for ``source`` (``trust_code=True``).
        source: the file whose class paths are resolved, for the message.
    """
    token = _trust.set((trusted, source))
    try:
        yield
    finally:
        _trust.reset(token)


def import_class(class_path: str, what: str = "class") -> Any:
    """Import ``package.module.Attr``: the one place where a config's class path becomes code.

    Inside ``code_trust(False, ...)`` (loading a file that may come from a stranger) only modules of
    lightningllm, of ``lightningllm_plugins`` and of registered plugins are imported; anything else is
    refused before it is imported, so its import-time code never runs.

    Raises:
        UnsafeConfigError: an untrusted module while code is not trusted.
        ImportError, AttributeError: no such module or attribute.
    """
    module_name, _, attr = class_path.rpartition(".")
    trusted, source = _trust.get()
    if not trusted and not is_trusted_module(module_name):
        raise UnsafeConfigError(
            f"{source or 'The config'} names the {what} {class_path!r}, which is neither a registered plugin nor "
            f"part of lightningllm, so loading it would import and run the code of module {module_name!r}. "
            "Loading runs only lightningllm's and its registered plugins' code by default; if you trust where "
            "this file comes from, pass trust_code=True (on the command line: --trust_code true)."
        )
    if not module_name:
        raise ImportError(f"{class_path!r} is not a dotted import path")
    return getattr(importlib.import_module(module_name), attr)


def is_trusted_module(module_name: str) -> bool:
    """Whether ``module_name`` belongs to lightningllm, ``lightningllm_plugins`` or a registered plugin."""
    if module_name.split(".")[0] in ("lightningllm", "lightningllm_plugins"):
        return True
    return module_name in registry.plugin_modules()


def class_name(cls: type) -> str:
    """Short registry name if ``cls`` is registered under it, else the full import path."""
    for kind in registry.KINDS:
        try:
            if registry.get(kind, cls.__name__) is cls:
                return cls.__name__
        except registry.PluginNotFoundError:
            continue
    return f"{cls.__module__}.{cls.__qualname__}"
