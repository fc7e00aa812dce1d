"""Export folders: ``config.yaml`` + ``model.safetensors`` + the tokenizer's files.

Every write goes to a temporary sibling first and is renamed into place, so a crash
never leaves a half-written export, and a failed export never damages an existing one.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import yaml
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from lightningllm.atomic import atomic_directory
from lightningllm.errors import ExportError
from lightningllm.tokenizer import META_FILE, Tokenizer

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"


def export(model: nn.Module, directory: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``directory``, replacing any previous export atomically.

    The model must describe itself through a ``config`` dict and a ``from_config`` classmethod
    (as :class:`lightningllm.models.Decoder` does).
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
    directory = Path(directory)
    with atomic_directory(directory, replace=True) as staging:
        spec = {"class_path": f"{type(model).__module__}.{type(model).__qualname__}", "init_args": config}
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
        save_model(_unwrapped(model), str(staging / WEIGHTS_FILE))
        if tokenizer is not None:
            tokenizer.save(staging)
    return directory


def load(directory: str | os.PathLike, *, device: str = "cpu") -> tuple[nn.Module, Tokenizer | None]:
    """Rebuild the model of an export folder and load its weights and tokenizer.

    Raises:
        ExportError: a missing file, weights that do not fit the config (an export of another
            architecture), or a tokenizer larger than the model's vocabulary.
    """
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise ExportError(f"{str(directory)!r} is not a lightningllm export: {name} is missing.")
    spec = yaml.safe_load((directory / CONFIG_FILE).read_text())
    model = _model_class(spec["class_path"]).from_config(spec["init_args"])
    _check_weights_fit(model, directory / WEIGHTS_FILE)
    load_model(model, str(directory / WEIGHTS_FILE), strict=True, device=device)
    tokenizer = Tokenizer.load(directory) if (directory / META_FILE).is_file() else None
    vocab_size = spec["init_args"].get("vocab_size")
    if tokenizer is not None and vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise ExportError(
            f"The export in {str(directory)!r} pairs a tokenizer of {tokenizer.vocab_size} tokens with a model "
            f"of vocab_size {vocab_size}; the files do not belong together."
        )
    return model.to(device).eval(), tokenizer


def _check_weights_fit(model: nn.Module, weights: Path) -> None:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    with safe_open(str(weights), framework="pt") as f:
        found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
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


def _is_tied_alias(name: str, found: dict, expected: dict) -> bool:
    # save_model drops one name of each shared tensor (e.g. a tied lm_head.weight)
    return any(other in found and expected[other] == expected[name] for other in expected if other != name)


def _model_class(class_path: str) -> type:
    module_name, _, attr = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ExportError(f"The export names model class {class_path!r}, which cannot be imported.") from None


def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper
