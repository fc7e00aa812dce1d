"""One adapter of a lightningllm model as a Hugging Face PEFT folder, for the converted Hugging Face model.

The folder holds ``adapter_config.json`` (the adapter's :meth:`~lightningllm.contracts.Adapter.peft_config`)
and ``adapter_model.safetensors`` (its weights under PEFT's names: ``base_model.model.`` + the Hugging Face
module + the adapter's :attr:`~lightningllm.contracts.Adapter.peft_keys` name), so that
``PeftModel.from_pretrained(hf_model, folder)`` on the model ``to_hf`` writes computes what ours does. Module
names come from the family table that ``to_hf`` would use (the converter's name mapping).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lightningllm.atomic import FolderRule, atomic_directory
from lightningllm.convert.hf import _export_family, _plan
from lightningllm.convert.table import ConversionError
from lightningllm.io import canonical_names

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_FOLDER = FolderRule(
    "Hugging Face PEFT adapter folder",
    required=frozenset({PEFT_CONFIG, PEFT_WEIGHTS}),
    allowed=lambda folder: frozenset({PEFT_CONFIG, PEFT_WEIGHTS}),
)


def save_peft_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str,
    *,
    base: str | os.PathLike | None = None,
    family: str | None = None,
) -> Path:
    """Write adapter ``name`` of ``model`` as a PEFT folder for the Hugging Face model of ``model``'s base.

    Args:
        model: a lightningllm model holding adapter ``name`` (unmerged).
        directory: the folder (replaced atomically if it is an earlier PEFT folder).
        name: the adapter to write (PEFT's ``default`` adapter once loaded).
        base: the Hugging Face base model, recorded as ``base_model_name_or_path``.
        family: the Hugging Face ``model_type`` (None: the family ``to_hf`` picks).

    Raises:
        ConversionError: no family represents the base model, or an adapted layer has no plain Hugging Face
            linear (a fused or transposed weight).
        ConfigError: the adapter has no PEFT equivalent.
    """
    from lightningllm.adapters import adapter_modules, adapter_specs
    from lightningllm.lifecycle import build_transform

    spec = next(s for s in adapter_specs(model) if (s.get("init_args") or {}).get("name", "default") == name)
    adapter = build_transform(spec)
    if not adapter.peft_keys:
        adapter.peft_config({})  # raises: PEFT has no such adapter
    hf_modules = _hf_module_names(model, family)
    wrappers = [(prefix, m) for prefix, m in adapter_modules(model) if name in m.adapter_names()]
    layers = {prefix: _hf_module(hf_modules, prefix) for prefix, _ in wrappers}
    config = {**adapter.peft_config(layers), "base_model_name_or_path": None if base is None else str(base)}
    tensors = {}
    for prefix, wrapper in wrappers:
        for ours, theirs in adapter.peft_keys.items():
            tensor = wrapper.get_parameter(ours.format(name=name)).detach()
            tensors[f"base_model.model.{layers[prefix]}.{theirs}"] = tensor.contiguous().cpu()
    directory = Path(directory)
    with atomic_directory(directory, replace=PEFT_FOLDER) as staging:
        (staging / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(staging / PEFT_WEIGHTS), metadata={"format": "pt"})
    return directory


def _hf_module_names(model: nn.Module, family: str | None) -> dict[str, str]:
    """{our weight name: its Hugging Face name} of the plain (one tensor, same layout) weights of the base model."""
    with torch.device("meta"):
        base = type(model).from_config({**model.config, "transforms": []})
    table, _ = _export_family(base, family, f"this {type(model).__name__}")
    canonical, aliases = canonical_names(base)
    plan, _ = _plan(table, canonical, aliases, base.config)
    return {ours[0]: hf for hf, ours, weight in plan if len(ours) == 1 and not weight.transpose}


def _hf_module(hf_names: dict[str, str], prefix: str) -> str:
    weight = prefix.replace(".base_layer", "") + ".weight"  # the base layer's weight, inside any other wrapper
    if weight not in hf_names:
        raise ConversionError(
            f"The adapted layer {prefix} has no plain Hugging Face linear of its own (its weight is fused with "
            "others or stored transposed there), so PEFT could not place the adapter. Target other layers, or "
            "merge the adapter (lightningllm.adapters.merge_and_unload) and convert the whole model with to_hf."
        )
    return hf_names[weight].removesuffix(".weight")
