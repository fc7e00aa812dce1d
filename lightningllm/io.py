"""Export folders: ``config.yaml`` + ``model.safetensors`` + the tokenizer's files.

Every write goes to a temporary sibling first and is renamed into place, so a crash
never leaves a half-written export, and a failed export never damages an existing one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_model
from torch import nn

from lightningllm.atomic import FolderRule, atomic_directory, recover
from lightningllm.config import code_trust, import_class
from lightningllm.errors import ExportError, LightningLLMError, UnsafeConfigError, write_error
from lightningllm.tokenizer import META_FILE, Tokenizer, saved_files

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"

EXPORT_FOLDER = FolderRule(
    "lightningllm export",
    required=frozenset({CONFIG_FILE, WEIGHTS_FILE}),
    allowed=lambda folder: frozenset({CONFIG_FILE, WEIGHTS_FILE}) | saved_files(folder),
)


def export(model: nn.Module, directory: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``directory``, replacing an earlier export atomically.

    The model must describe itself through a ``config`` dict and a ``from_config`` classmethod
    (as :class:`lightningllm.models.Decoder` does).

    Raises:
        ExportError: a model that cannot be exported, or a tokenizer larger than its vocabulary.
        WriteError: ``directory`` holds files that are not an export (nothing is touched), or the
            filesystem refused the write.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or not hasattr(type(model), "from_config"):
        raise ExportError(
            f"Cannot export {type(model).__name__}: an exportable model has a `config` dict and a "
            "`from_config` classmethod (lightningllm.models.Decoder has both)."
        )
    if tokenizer is not None and tokenizer.vocab_size > config.get("vocab_size", tokenizer.vocab_size):
        raise ExportError(
            f"The tokenizer has {tokenizer.vocab_size} tokens but the model only {config['vocab_size']}; "
            "refusing to export a pair that cannot work together."
        )
    if tokenizer is not None and tokenizer.vocab_size < config.get("vocab_size", tokenizer.vocab_size):
        log.warning(
            "Exporting a model of vocab_size %d with a tokenizer of %d tokens: ids %d..%d decode to no text "
            "(span-corruption sentinels, or unused rows); generate never samples them from a decoder.",
            config["vocab_size"], tokenizer.vocab_size, tokenizer.vocab_size, config["vocab_size"] - 1,
        )  # fmt: skip
    directory = Path(directory)
    with atomic_directory(directory, replace=EXPORT_FOLDER) as staging:
        spec = {"class_path": f"{type(model).__module__}.{type(model).__qualname__}", "init_args": config}
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
        save_model(_unwrapped(model), str(staging / WEIGHTS_FILE))
        if tokenizer is not None:
            tokenizer.save(staging)
    return directory


def check_target(directory: str | os.PathLike) -> None:
    """Raise now what :func:`export` would refuse later: ``directory`` holds files that are not an export.

    Finishes an export that a killed process left half-swapped first.
    """
    directory = Path(directory)
    try:
        recover(directory)
    except OSError as err:
        raise (write_error(err, directory) or err) from None
    EXPORT_FOLDER.check(directory)


def load(
    directory: str | os.PathLike, *, device: str = "cpu", trust_code: bool = False
) -> tuple[nn.Module, Tokenizer | None]:
    """Rebuild the model of an export folder and load its weights and tokenizer.

    Args:
        directory: the export folder.
        device: where the weights go.
        trust_code: import any class the folder's config names. By default only lightningllm's classes
            and registered plugins are imported: an export may come from a stranger.

    Raises:
        ExportError: a missing, empty or damaged file, weights that do not fit the config (an export of
            another architecture) or hold NaN or Inf, or a tokenizer larger than the model's vocabulary.
        UnsafeConfigError: the config names code outside lightningllm and its plugins, without ``trust_code``.
    """
    directory = Path(directory)
    try:
        recover(directory)  # a kill between the two renames of an export left the previous one aside
    except OSError as err:
        raise (write_error(err, directory) or err) from None
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise ExportError(f"{str(directory)!r} is not a lightningllm export: {name} is missing.")
    spec = _read_spec(directory / CONFIG_FILE)
    with code_trust(trust_code, f"{str(directory / CONFIG_FILE)!r}"):
        model = _build(spec, directory / CONFIG_FILE)
        _check_weights_fit(model, directory / WEIGHTS_FILE)
        state = _current_names(load_file(str(directory / WEIGHTS_FILE), device=device), model)
        model.load_state_dict(state, strict=False)  # _check_weights_fit: only tied aliases are absent
        check_finite(model.state_dict(), str(directory / WEIGHTS_FILE))
        tokenizer = Tokenizer.load(directory) if (directory / META_FILE).is_file() else None
    vocab_size = spec["init_args"].get("vocab_size")
    if tokenizer is not None and vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise ExportError(
            f"The export in {str(directory)!r} pairs a tokenizer of {tokenizer.vocab_size} tokens with a model "
            f"of vocab_size {vocab_size}; the files do not belong together."
        )
    return model.to(device).eval(), tokenizer


def check_finite(state: dict[str, Any], source: str) -> None:
    """Raise :class:`ExportError` naming the first floating-point tensor of ``state`` that holds NaN or Inf."""
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            n_nan, n_inf = int(tensor.isnan().sum()), int(tensor.isinf().sum())
            raise ExportError(
                f"The weights in {source!r} are not usable: tensor {name!r} holds {n_nan} NaN and {n_inf} Inf "
                f"values (of {tensor.numel()}). The run that wrote them diverged; load an earlier checkpoint "
                "or export, or train again with a lower learning rate or gradient clipping."
            )


def _read_spec(path: Path) -> dict[str, Any]:
    """The ``{class_path, init_args}`` dict of an export's config.yaml."""
    try:
        spec = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ExportError(f"{str(path)!r} is not valid YAML ({type(err).__name__}); the export is damaged.") from None
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("class_path"), str)
        or not isinstance(spec.get("init_args"), dict)
    ):
        found = "an empty file" if spec is None else f"a {type(spec).__name__}"
        if isinstance(spec, dict):
            found = f"a mapping with keys {', '.join(map(str, spec)) or 'none'}"
        raise ExportError(
            f"{str(path)!r} is not an export config: expected a mapping with 'class_path' (the model class) and "
            f"'init_args' (its config), as export writes, but found {found}. The export is damaged."
        )
    return spec


def _build(spec: dict[str, Any], path: Path) -> nn.Module:
    class_path = spec["class_path"]
    try:
        cls = import_class(class_path, "model class")
    except (ImportError, AttributeError, ValueError):
        raise ExportError(f"{str(path)!r} names model class {class_path!r}, which cannot be imported.") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "from_config")):
        raise ExportError(
            f"{str(path)!r} names {class_path!r} as its model class, which is not a lightningllm model (a module "
            "with a from_config classmethod, such as lightningllm.models.Decoder). The export is damaged."
        )
    try:
        return cls.from_config(spec["init_args"])
    except UnsafeConfigError:
        raise
    except LightningLLMError as err:
        raise ExportError(f"{str(path)!r} does not describe a valid {cls.__name__}: {err}") from None
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        raise ExportError(
            f"{str(path)!r} does not describe a {cls.__name__} ({type(err).__name__}: {err}); its class_path or "
            "init_args were probably edited. Restore the config.yaml that was exported with these weights."
        ) from None


def _check_weights_fit(model: nn.Module, weights: Path) -> None:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    try:
        with safe_open(str(weights), framework="pt") as f:
            found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
        size = weights.stat().st_size
        raise ExportError(
            f"{str(weights)!r} ({size} bytes) is not a complete safetensors file ({err}); it was probably "
            "truncated by a full disk or an interrupted copy. Export the model again, or copy the file again."
        ) from None
    found = _current_names(found, model)
    missing = [n for n in expected if n not in found and not _is_tied_alias(n, found, expected)]
    unexpected = [n for n in found if n not in expected]
    wrong = [f"{n}: {found[n]} vs {expected[n]}" for n in found if n in expected and found[n] != expected[n]]
    if missing or unexpected or wrong:
        details = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing[:5])}" if missing else "",
                f"unexpected {', '.join(unexpected[:5])}" if unexpected else "",
                f"shape mismatch {', '.join(wrong[:5])}" if wrong else "",
            )
            if part
        )
        raise ExportError(
            f"The weights in {str(weights)!r} do not fit the architecture in its config.yaml ({details}). "
            "The export was probably written by a different architecture or edited by hand."
        )


def _current_names(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``state`` with the names of earlier exports (the model's ``renamed_weights`` prefixes) as the model names them
    now; names the model has are kept as they are."""
    renamed, ours = getattr(model, "renamed_weights", {}), model.state_dict()

    def current(name: str) -> str:
        old = next((prefix for prefix in renamed if name.startswith(prefix)), None)
        return renamed[old] + name[len(old) :] if old and name not in ours else name

    return {current(name): value for name, value in state.items()}


def canonical_names(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Our weight names, each shared tensor once; and {alias name: the name it shares a tensor with}."""
    seen: dict[int, str] = {}
    canonical, aliases = [], {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            aliases[name] = seen[id(tensor)]
        else:
            seen[id(tensor)] = name
            canonical.append(name)
    return canonical, aliases


def _is_tied_alias(name: str, found: dict, expected: dict) -> bool:
    # save_model drops one name of each shared tensor (e.g. a tied lm_head.weight)
    return any(other in found and expected[other] == expected[name] for other in expected if other != name)


def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper
