"""Model-wide adapter operations: disable, switch, merge, and adapter-only weights in safetensors.

Adapters are transforms (:class:`~lightningllm.contracts.Adapter`) that leave
:class:`~lightningllm.contracts.AdapterModule` s in the model; these functions act on all of them.
An adapter folder holds ``adapter.safetensors`` (the adapter parameters under their model names) and
``adapter.yaml`` (the adapter transforms as the model config records them, and the base export they
were trained on), so :func:`load_adapter` rebuilds the adapters on a fresh base and loads their weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from lightningllm.atomic import FolderRule, atomic_directory
from lightningllm.contracts import Adapter, AdapterModule
from lightningllm.errors import ConfigError, ExportError, LightningLLMError

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.yaml"
ADAPTER_FOLDER = FolderRule(
    "lightningllm adapter folder",
    required=frozenset({ADAPTER_WEIGHTS, ADAPTER_CONFIG}),
    allowed=lambda folder: frozenset({ADAPTER_WEIGHTS, ADAPTER_CONFIG}),
)


class AdapterError(LightningLLMError):
    """An adapter operation the model's state does not allow, or adapter weights for another base."""


class AdapterLayer(AdapterModule):
    """An adapter module around one frozen module, kept as ``base_layer`` (PEFT's layer): the bookkeeping every
    such wrapper shares (the switches, the base's sizes, unloading). Subclasses hold their adapters by name.

    Args:
        base_layer: the module it wraps (its parameters keep their names under ``base_layer.``).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.enabled, self.active, self.merged = True, [], []

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def unload(self) -> nn.Module:
        return self.base_layer


def check_adapter_name(kind: str, name: str) -> None:
    """Refuse an adapter name that cannot key a ``ModuleDict`` (empty, or with dots).

    Raises:
        ConfigError: the bad name, in one paragraph.
    """
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"{kind} name={name!r} must be a non-empty name without dots (it is a ModuleDict key).")


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` in place of ``model``'s submodule ``name`` (a wrapper around it) and return it."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
    return module


def train_only(model: nn.Module, params: Iterable[nn.Parameter]) -> str:
    """Freeze every parameter of ``model`` but ``params``; return ``N of M parameters train (x.xxx%)`` for the log."""
    mine = {id(param) for param in params}
    for param in model.parameters():
        param.requires_grad_(id(param) in mine)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable} of {total} parameters train ({100 * trainable / total:.3f}%)"


def parameters_of(modules: Iterable[AdapterModule], name: str) -> list[nn.Parameter]:
    """The parameters of adapter ``name`` in ``modules``."""
    return [module.get_parameter(param) for module in modules for param in module.adapter_params(name)]


def adapter_modules(model: nn.Module) -> list[tuple[str, AdapterModule]]:
    """(name, module) of every adapter module of ``model``, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, AdapterModule)]


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters on ``model``, in the order they were added."""
    names: dict[str, None] = {}
    for _, module in adapter_modules(model):
        names.update(dict.fromkeys(module.adapter_names()))
    return list(names)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every adapter of ``model`` is off: the model computes what its base computes.

    Raises:
        AdapterError: an adapter is merged into the base weights (unmerge it first).
    """
    modules = [module for _, module in adapter_modules(model)]
    _refuse_merged(modules, "disable adapters")
    before = [module.enabled for module in modules]
    for module in modules:
        module.enabled = False
    try:
        yield model
    finally:
        for module, enabled in zip(modules, before, strict=True):
            module.enabled = enabled


def set_active_adapters(model: nn.Module, names: list[str] | str) -> None:
    """Make ``names`` the adapters that compute and train; the others stay on the model, frozen and off.

    Raises:
        AdapterError: an unknown name, or a merged adapter (unmerge first).
    """
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_names(model)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise AdapterError(
            f"No adapter named {', '.join(map(repr, unknown))} on {type(model).__name__}; "
            f"its adapters are {', '.join(known) or '(none)'}."
        )
    modules = [module for _, module in adapter_modules(model)]
    _refuse_merged(modules, "switch adapters")
    for module in modules:
        module.active = [name for name in module.adapter_names() if name in names]
        for name in module.adapter_names():
            for param in module.adapter_params(name):
                module.get_parameter(param).requires_grad_(name in names)


def merge_adapters(model: nn.Module) -> None:
    """Fold every active adapter into its base weights (outputs unchanged up to rounding; faster inference).

    Raises:
        AdapterError: an adapter that cannot merge (the reason is named); nothing stays merged then.
    """
    try:
        for _, module in adapter_modules(model):
            module.merge()
    except LightningLLMError:
        unmerge_adapters(model)
        raise


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and put the plain modules back: a model without adapters that computes what
    the adapted one did, whose config no longer names the adapters (so :func:`lightningllm.io.export` writes
    a plain export). Inactive adapters are dropped.

    Raises:
        AdapterError: an adapter that cannot merge (the model is left as it was).
    """
    merge_adapters(model)
    for name, module in reversed(adapter_modules(model)):  # inner modules first
        parent, _, child = name.rpartition(".")
        if name:
            setattr(model.get_submodule(parent), child, module.unload())
    config = getattr(model, "config", None)
    if isinstance(config, dict) and config.get("transforms"):
        adapters = adapter_specs(model)
        config["transforms"] = [spec for spec in config["transforms"] if spec not in adapters]
    return model


def unmerge_adapters(model: nn.Module) -> None:
    """Take every merged adapter back out of its base weights."""
    for _, module in adapter_modules(model):
        module.unmerge()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters of ``model`` under their names in ``model.state_dict()``."""
    state = {}
    for prefix, module in adapter_modules(model):
        for name in module.adapter_names():
            for param in module.adapter_params(name):
                state[f"{prefix}.{param}"] = module.get_parameter(param)
    return state


def adapter_specs(model: nn.Module) -> list[dict[str, Any]]:
    """The adapter transforms of ``model.config["transforms"]`` (``{class_path, init_args}``)."""
    from lightningllm.lifecycle import build_transform

    specs = getattr(model, "config", {}).get("transforms") or []
    return [spec for spec in specs if isinstance(build_transform(spec), Adapter)]


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    base: str | os.PathLike | None = None,
    format: Literal["lightningllm", "peft"] = "lightningllm",
    name: str | None = None,
) -> Path:
    """Write the adapters of ``model`` alone: their weights in safetensors and how to rebuild them.

    Args:
        model: a lightningllm model with adapters applied as transforms.
        directory: the adapter folder (replaced atomically if it is an earlier adapter folder).
        base: the base export the adapters were trained on, recorded for the reader (with ``peft``: the
            Hugging Face base, PEFT's ``base_model_name_or_path``).
        format: ``lightningllm`` (every adapter; :func:`load_adapter` reads it) or ``peft``: one adapter as a
            Hugging Face PEFT folder for the model :func:`lightningllm.convert.to_hf` writes
            (:mod:`lightningllm.convert.peft`; LoRA, DoRA and IA3).
        name: with ``peft``, the adapter to write (None: the model's only adapter).

    Raises:
        AdapterError: the model has no adapters, one of them is merged, or ``name`` is unknown or missing.
        ConfigError: with ``peft``, an adapter PEFT has no equivalent of, or a model no family converts.
    """
    state = adapter_state_dict(model)
    if not state:
        raise AdapterError(f"{type(model).__name__} has no adapters to save; apply one as a transform first.")
    _refuse_merged([module for _, module in adapter_modules(model)], "save adapter-only weights")
    if format == "peft":
        from lightningllm.convert.peft import save_peft_adapter

        return save_peft_adapter(model, directory, _one_adapter(model, name), base=base)
    if format != "lightningllm":
        raise AdapterError(f"save_adapter format={format!r} is unknown: choose lightningllm or peft.")
    config = {"base": None if base is None else str(base), "transforms": adapter_specs(model)}
    directory = Path(directory)
    with atomic_directory(directory, replace=ADAPTER_FOLDER) as staging:
        (staging / ADAPTER_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
        save_file({name: t.detach().contiguous().cpu() for name, t in state.items()}, str(staging / ADAPTER_WEIGHTS))
    return directory


def load_adapter(model: nn.Module, directory: str | os.PathLike, trust_code: bool = False) -> nn.Module:
    """Apply the adapters of an adapter folder to ``model`` (unless it holds them already) and load their weights.

    Args:
        model: the base the adapters were trained on.
        directory: a folder :func:`save_adapter` wrote.
        trust_code: let ``adapter.yaml`` name adapter classes by any import path (by default only registered
            plugins and lightningllm's own classes load, as for an export).

    Raises:
        ExportError: a missing or damaged adapter folder.
        AdapterError: weights that do not fit ``model`` (an adapter trained on another base).
    """
    from lightningllm.config import code_trust
    from lightningllm.lifecycle import build_transform

    directory = Path(directory)
    config, weights = _read_adapter(directory)
    held = set(adapter_names(model))
    with code_trust(trust_code, str(directory / ADAPTER_CONFIG)):
        for spec in config.get("transforms") or []:
            if (spec.get("init_args") or {}).get("name", "default") not in held:
                model.apply_transform(build_transform(spec))
    expected = adapter_state_dict(model)
    _check_fit(weights, expected, directory, config.get("base"))
    with torch.no_grad():
        for name, tensor in weights.items():
            expected[name].copy_(tensor)
    return model


def _read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise ExportError(
                f"{str(directory)!r} is not an adapter folder: {name} is missing (save_adapter writes it)."
            )
    try:
        config = yaml.safe_load((directory / ADAPTER_CONFIG).read_text()) or {}
        weights = load_file(str(directory / ADAPTER_WEIGHTS))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
        raise ExportError(f"The adapter folder {str(directory)!r} is damaged: {err}.") from None
    if not isinstance(config, dict):
        raise ExportError(f"{str(directory / ADAPTER_CONFIG)!r} is not a mapping; the adapter folder is damaged.")
    return config, weights


def _check_fit(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], directory: Path, base) -> None:
    where = f"It was saved for the base {base!r}; load it into that model." if base else "Load it into its own base."
    for name, tensor in found.items():
        if name not in expected:
            raise AdapterError(
                f"The adapter in {str(directory)!r} holds {name!r}, which this model has no place for (its adapter "
                f"weights are {', '.join(list(expected)[:4])}{' ...' if len(expected) > 4 else ''}). {where}"
            )
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise AdapterError(
                f"The adapter in {str(directory)!r} was trained for another base: its tensor {name!r} has shape "
                f"{tuple(tensor.shape)} but this model's has {tuple(expected[name].shape)}. {where}"
            )
    missing = sorted(set(expected) - set(found))
    if missing:
        raise AdapterError(f"The adapter in {str(directory)!r} lacks {missing[0]!r} of this model's adapters. {where}")


def _one_adapter(model: nn.Module, name: str | None) -> str:
    names = adapter_names(model)
    if name is None and len(names) == 1:
        return names[0]
    if name not in names:
        raise AdapterError(
            f"A PEFT folder holds one adapter; {'give its name' if name is None else f'{name!r} is not one'} "
            f"(name=...): {type(model).__name__} holds {', '.join(names)}."
        )
    return name


def _refuse_merged(modules: list[AdapterModule], action: str) -> None:
    if any(module.merged for module in modules):
        raise AdapterError(
            f"Cannot {action} while adapters are merged into the base weights: the base no longer computes what "
            "it did. Call lightningllm.adapters.unmerge_adapters(model) first."
        )


__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterError", "AdapterLayer", "adapter_modules", "adapter_names",
    "adapter_specs", "adapter_state_dict", "check_adapter_name", "disabled", "load_adapter", "merge_adapters",
    "merge_and_unload", "parameters_of", "replace_module", "save_adapter", "set_active_adapters", "train_only",
    "unmerge_adapters",
]  # fmt: skip
