"""The plugin registry: one dict per kind, filled by ``@register``.

A plugin's key is its class name, so the string in YAML (``class_path: RoPE``), in
``lightningllm plugins`` and in error messages is the same. Plugins are discovered
through the entry-point group ``lightningllm.plugins``; an entry point that names a
package imports every module under it. Our built-ins register through that very group.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TypeVar

from lightningllm.errors import DuplicatePluginError, PluginNotFoundError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lightningllm.plugins"
KINDS = ("position", "attention", "ffn", "norm", "block", "head", "transform", "tokenizer", "adapter", "judge")

T = TypeVar("T", bound=type)

_registry: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}
_sources: dict[tuple[str, str], str] = {}
_loaded = False


def register(kind: str, name: str | None = None) -> Callable[[T], T]:
    """Class decorator: register ``cls`` under ``(kind, name or cls.__name__)``.

    Raises:
        PluginNotFoundError: ``kind`` is not one of :data:`KINDS`.
        DuplicatePluginError: another class already holds that name.
    """
    _check_kind(kind)

    def decorate(cls: T) -> T:
        key = name or cls.__name__
        held = _registry[kind].get(key)
        if held is not None and held is not cls and _qualname(held) != _qualname(cls):
            raise DuplicatePluginError(
                f"Cannot register {_qualname(cls)} as {kind} plugin {key!r}: that name already belongs to "
                f"{_qualname(held)}. Give the new plugin another class name or pass register({kind!r}, name=...)."
            )
        _registry[kind][key] = cls
        _sources[(kind, key)] = cls.__module__
        return cls

    return decorate


def get(kind: str, name: str) -> type:
    """Return the class registered under ``(kind, name)``, loading plugins on first use."""
    _check_kind(kind)
    load_plugins()
    try:
        return _registry[kind][name]
    except KeyError:
        raise PluginNotFoundError(
            f"Unknown {kind} plugin {name!r}. Registered {kind} plugins: {', '.join(available(kind)) or 'none'}. "
            "A class outside the registry can be named by its full import path (class_path: package.module.Class)."
        ) from None


def available(kind: str) -> list[str]:
    """Sorted names of the registered plugins of ``kind``."""
    _check_kind(kind)
    load_plugins()
    return sorted(_registry[kind])


def source(kind: str, name: str) -> str:
    """The module that defined the plugin, e.g. ``lightningllm_plugins.position.rope``."""
    get(kind, name)
    return _sources[(kind, name)]


def plugin_modules() -> frozenset[str]:
    """The modules that define registered plugins (the code a user installed as plugins)."""
    load_plugins()
    return frozenset(_sources.values())


def load_plugins() -> None:
    """Import every plugin module advertised under the ``lightningllm.plugins`` entry-point group.

    Idempotent. A broken third-party plugin is logged and skipped so it cannot take the others down.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            _import_tree(entry_point.value.split(":")[0])
        except Exception:  # noqa: BLE001 - one bad plugin must not hide the rest
            log.exception("Could not load lightningllm plugin %r (%s)", entry_point.name, entry_point.value)


def _import_tree(module_name: str) -> None:
    module = importlib.import_module(module_name)
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=f"{module_name}."):
        importlib.import_module(info.name)


def _check_kind(kind: str) -> None:
    if kind not in _registry:
        raise PluginNotFoundError(f"Unknown plugin kind {kind!r}. Plugin kinds: {', '.join(KINDS)}.")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
