"""Start weights: a run begins from a lightningllm export folder or a Hugging Face folder instead of random init.

The backbone must fit exactly (every tensor present, none unknown, same shapes): anything else is one
paragraph naming the mismatching tensors. The head loads only when the start weights hold the same
head (same class, names and shapes); otherwise it keeps its fresh initialisation and the log says so,
which is how an LM export starts a classifier.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightningllm.errors import ConfigError
from lightningllm.io import canonical_names

log = logging.getLogger(__name__)

HEAD_PREFIX = "head."


class StartWeightsError(ConfigError):
    """Start weights that cannot be read or do not fit the configured model."""


def read_start_weights(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state dict and model config of an export folder or a Hugging Face folder (converted in memory).

    Always on the CPU, also when the caller builds its model on the meta device.
    """
    directory = Path(path)
    with torch.device("cpu"):
        if (directory / "config.yaml").is_file():
            from lightningllm.io import load

            model, _ = load(directory)
        elif (directory / "config.json").is_file():
            from lightningllm.convert.hf import read_hf

            model = read_hf(directory)
        else:
            raise StartWeightsError(
                f"start_weights={str(path)!r} is neither a lightningllm export folder (config.yaml with "
                "model.safetensors) nor a Hugging Face model folder (config.json with model.safetensors). Give one "
                "of those folders, or leave start_weights unset to start from random initialisation."
            )
    return model.state_dict(), dict(model.config)


def load_start_weights(model: nn.Module, path: str | os.PathLike) -> bool:
    """Load ``path`` into ``model``: the whole backbone, and the head when the start weights have the same one.

    Returns:
        True when the model's head has tensors and the start weights lacked them (the head is new).

    Meta tensors are replaced by the loaded ones (FSDP then materialises only what is left, each
    module by its own rule); real tensors are copied into, which keeps tied weights tied.

    Raises:
        StartWeightsError: the backbone tensors do not match (listed by name and shape).
    """
    state, source_config = read_start_weights(path)
    canonical, aliases = canonical_names(model)
    ours = model.state_dict()
    backbone = [n for n in canonical if not n.startswith(HEAD_PREFIX)]
    _check_backbone(model, path, backbone, ours, state)
    head = [n for n in canonical if n.startswith(HEAD_PREFIX)]
    same_head = (source_config.get("head") or {}).get("class_path") == model.config["head"]["class_path"]
    head_fits = same_head and all(n in state and state[n].shape == ours[n].shape for n in head)
    names = backbone + (head if head_fits else [])
    _load(model, {n: state[n] for n in names}, aliases)
    head_name = model.config["head"]["class_path"]
    if head and not head_fits:
        found = sorted(n for n in state if n.startswith(HEAD_PREFIX))
        log.info("start weights %s: backbone loaded; the %s head is new (the start weights hold %s)", path, head_name,
                 f"a {(source_config.get('head') or {}).get('class_path', 'different')} head: {', '.join(found)}"
                 if found else "no head")  # fmt: skip
    else:
        log.info("start weights %s: backbone and %s head loaded (%d tensors)", path, head_name, len(names))
    return bool(head) and not head_fits


def _check_backbone(model: nn.Module, path, backbone: list[str], ours: dict, state: dict) -> None:
    missing = [n for n in backbone if n not in state]
    unexpected = [n for n in state if not n.startswith(HEAD_PREFIX) and n not in ours]
    wrong = [f"{n} {tuple(state[n].shape)} vs {tuple(ours[n].shape)}" for n in backbone
             if n in state and state[n].shape != ours[n].shape]  # fmt: skip
    if not (missing or unexpected or wrong):
        return
    parts = [
        f"missing {_listed(missing)}" if missing else "",
        f"unexpected {_listed(unexpected)}" if unexpected else "",
        f"shape mismatch (start weights vs model) {_listed(wrong)}" if wrong else "",
    ]
    raise StartWeightsError(
        f"The start weights in {str(path)!r} do not fit the configured {type(model).__name__}: "
        f"{'; '.join(p for p in parts if p)}. They hold another architecture or another size: configure the model "
        "as the start weights were trained (their config.yaml or config.json says how), or start from random "
        "initialisation (start_weights: null)."
    )


def _listed(names: list[str], shown: int = 8) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _load(model: nn.Module, state: dict[str, Tensor], aliases: dict[str, str]) -> None:
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in state.items():
            target = targets[name]
            if not target.is_meta:
                target.copy_(value)
                continue
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            value = value.to(target.dtype)
            if isinstance(target, nn.Parameter):
                setattr(module, attr, nn.Parameter(value, requires_grad=target.requires_grad))
            else:
                module._buffers[attr] = value
        for alias, name in aliases.items():  # assigned tensors replace shared ones: share them again
            owner, _, attr = alias.rpartition(".")
            source_owner, _, source_attr = name.rpartition(".")
            shared = getattr(model.get_submodule(source_owner) if source_owner else model, source_attr)
            setattr(model.get_submodule(owner) if owner else model, attr, shared)
