"""The one engine that applies a family table both ways: Hugging Face folder <-> lightningllm export.

``from_hf`` reads ``config.json``, ``model.safetensors`` (or the shards named by
``model.safetensors.index.json``) and ``tokenizer.json`` where present, and writes an export folder
(:func:`lightningllm.io.export`); ``to_hf`` reads an export folder and writes a folder that
``transformers`` loads with ``from_pretrained``. Neither needs ``transformers``. Both write atomically:
a conversion that fails leaves no folder (or the previous one) behind.

Config fields are mapped by the family's table; a field the table does not know, or supports at
another value only, is refused by name. Every weight is accounted for: each of ours must come from an
HF tensor, and each HF tensor must become one of ours, be the tied alias of one, or match one of the
table's ``ignored_weights`` (dropped with the reason recorded in :attr:`Conversion.notes`).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lightningllm.atomic import FolderRule, atomic_directory
from lightningllm.convert.families import FAMILIES
from lightningllm.convert.table import (
    ConversionError,
    Family,
    Field,
    Unsupported,
    Weight,
    set_path,
    with_plugin_defaults,
)
from lightningllm.errors import ConfigError
from lightningllm.io import canonical_names, check_target, export, load
from lightningllm.tokenizer import SPECIAL_TOKENS, Tokenizer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ROLES = ("pad", "unk", "bos", "eos", "mask")
HF_FOLDER = FolderRule(
    "Hugging Face folder written by lightningllm",
    required=frozenset({CONFIG, WEIGHTS}),
    allowed=lambda folder: frozenset({CONFIG, WEIGHTS, TOKENIZER, TOKENIZER_CONFIG}),
)


@dataclass
class Conversion:
    """What a conversion wrote.

    Attributes:
        path: the folder written.
        family: the HF ``model_type`` of the table used.
        notes: what did not carry over and why (dropped HF tensors, a tokenizer left behind).
    """

    path: Path
    family: str
    notes: list[str] = field(default_factory=list)


# --- Hugging Face -> lightningllm ------------------------------------------------------------


def from_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Conversion:
    """Convert a Hugging Face model folder into a lightningllm export folder.

    Args:
        hf_dir: holds ``config.json``, ``model.safetensors`` (or its shards and index) and
            optionally ``tokenizer.json``.
        out_dir: the export folder to write (replaced atomically if it exists).

    Raises:
        ConversionError: an unknown family, a config field the table refuses, missing, unexpected or
            misshapen weights; the message names every one.
    """
    hf_dir = Path(hf_dir)
    check_target(out_dir)  # refuse a folder of someone else's files before the conversion's work
    hf_config = read_config(hf_dir)
    notes: list[str] = []
    model, family = _read_model(hf_dir, hf_config, notes)
    tokenizer = _read_tokenizer(hf_dir, hf_config, notes)
    export(model, out_dir, tokenizer=tokenizer)
    return Conversion(Path(out_dir), family.model_type, notes)


def read_hf(hf_dir: str | os.PathLike) -> nn.Module:
    """The model of a Hugging Face folder, converted in memory (what ``start_weights: HF_DIR`` loads).

    Raises:
        ConversionError: as :func:`from_hf`.
    """
    hf_dir = Path(hf_dir)
    return _read_model(hf_dir, read_config(hf_dir), [])[0]


def _read_model(hf_dir: Path, hf_config: dict[str, Any], notes: list[str]) -> tuple[nn.Module, Family]:
    family = family_of(hf_config, hf_dir)
    config = our_config(family, hf_config, source=str(hf_dir))
    with _checkpoint(hf_dir) as tensors:
        if family.from_weights is not None:
            for path, value in family.from_weights(frozenset(tensors)).items():
                set_path(config, path, value)
        return _build_loaded(family, config, tensors, notes, source=str(hf_dir)), family


def read_config(hf_dir: Path) -> dict[str, Any]:
    """``config.json`` of a Hugging Face folder as a dict."""
    path = hf_dir / CONFIG
    if not path.is_file():
        raise ConversionError(
            f"{str(hf_dir)!r} is not a Hugging Face model folder: {CONFIG} is missing. Pass the folder that "
            "save_pretrained wrote (config.json beside model.safetensors)."
        )
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise ConversionError(f"{str(path)!r} is not valid JSON ({err}).") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{str(path)!r} holds a {type(config).__name__}, not a JSON object.")
    return config


def family_of(hf_config: Mapping[str, Any], hf_dir: Path) -> Family:
    """The table for the folder's ``model_type``."""
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ConversionError(
            f"{str(hf_dir)!r} holds a model_type={model_type!r} checkpoint, which lightningllm cannot convert. "
            f"Supported model types: {', '.join(FAMILIES)}."
        )
    return FAMILIES[model_type]


def our_config(family: Family, hf_config: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """Our model config from an HF config through ``family``; every refused field named in one error."""
    config = copy.deepcopy(family.skeleton)
    problems, known = [], set()
    missing = [name for name in _shape_fields(family) if name not in hf_config]
    if missing:
        raise ConversionError(
            f"{str(Path(source) / CONFIG)!r} has no {', '.join(missing)} field(s), which give the shape of the "
            f"{family.model_type} model and are never guessed. Add them (the values save_pretrained writes) or pass "
            "the folder save_pretrained wrote."
        )
    for entry in family.fields:
        known.update(entry.names)
        try:
            updates = entry.read(hf_config)
        except Unsupported as err:
            problems.append(str(err))
            continue
        except KeyError as err:  # a rule reading a field the config lacks
            problems.append(f"the field {err.args[0]!r} is missing")
            continue
        for path, value in updates.items():
            set_path(config, path, value)
    unknown = sorted(name for name in hf_config if name not in known)
    if unknown:
        listed = ", ".join(f"{name}={hf_config[name]!r}" for name in unknown)
        problems.append(
            f"field(s) unknown to the {family.model_type} table: {listed} (lightningllm cannot tell whether they "
            "change the computation)"
        )
    if problems:
        raise ConversionError(
            f"Cannot convert the {family.model_type} checkpoint in {source!r} exactly: {'; '.join(problems)}. "
            "lightningllm refuses such fields rather than ignore them; edit config.json only if you know the "
            "value does not matter for your use."
        )
    return config


#: Our config keys that fix the model's shape: the HF fields feeding them must be present, not defaulted.
SHAPE_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "n_encoder_layers", "n_decoder_layers")


def _shape_fields(family: Family) -> list[str]:
    """The HF fields of ``family``'s table that map onto :data:`SHAPE_KEYS`."""
    return [entry.hf for entry in family.fields if isinstance(entry, Field) and entry.ours in SHAPE_KEYS]


@contextmanager
def _checkpoint(hf_dir: Path) -> Iterator[dict[str, Any]]:
    """{HF tensor name: an open safetensors handle holding it}, for one file or an index of shards."""
    if (hf_dir / INDEX).is_file():
        try:
            weight_map = json.loads((hf_dir / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise ConversionError(
                f"{str(hf_dir / INDEX)!r} is not a safetensors index: expected a JSON object with a 'weight_map' "
                f"({type(err).__name__}: {err})."
            ) from None
        files = sorted(set(weight_map.values()))
    elif (hf_dir / WEIGHTS).is_file():
        files, weight_map = [WEIGHTS], None
    else:
        others = sorted(p.name for p in hf_dir.glob("*.bin"))
        hint = f" (found {', '.join(others)}: save with safe_serialization=True)" if others else ""
        raise ConversionError(
            f"No safetensors weights in {str(hf_dir)!r}: neither {WEIGHTS} nor {INDEX} is there{hint}."
        )
    handles = {}
    try:
        for name in files:
            if not (hf_dir / name).is_file():
                raise ConversionError(f"{str(hf_dir / INDEX)!r} names the shard {name!r}, which is missing.")
            handles[name] = safe_open(str(hf_dir / name), framework="pt")
        tensors = {}
        for name, handle in handles.items():
            for key in handle.keys():
                if weight_map is None or weight_map.get(key) == name:
                    tensors[key] = handle
        yield tensors
    finally:
        handles.clear()


def _build_loaded(
    family: Family, config: dict[str, Any], handles: dict[str, Any], notes: list[str], *, source: str
) -> nn.Module:
    """Our model with the checkpoint's tensors in it (built on the meta device, then assigned)."""
    with torch.device("meta"):
        model = family.model_class.from_config(config)
    canonical, aliases = canonical_names(model)
    targets = {name: tensor for name, tensor in model.state_dict().items()}
    plan, alias_hf = _plan(family, canonical, aliases, model.config)
    expected = {name for hf, _, weight in plan for name in _hf_names(hf, weight)} | set(alias_hf)
    names = _normalised_names(family, handles, expected)

    problems, state = [], {}
    for hf_name, ours, weight in plan:
        present = [name for name in _hf_names(hf_name, weight) if name in names]
        if not present:
            problems.append(f"missing {hf_name}")
            continue
        raw_name = [names.pop(name) for name in present][0]  # the first name present; its aliases are copies
        tensor = handles[raw_name].get_tensor(raw_name)
        for name, part in zip(ours, _to_ours(tensor, weight, [targets[n].shape for n in ours])):
            if part is None or part.shape != targets[name].shape:
                shape = tuple(tensor.shape) if part is None else tuple(part.shape)
                problems.append(f"{hf_name} has shape {shape}, {name} needs {tuple(targets[name].shape)}")
            else:
                state[name] = part.clone() if len(ours) > 1 else part.contiguous()  # no shared storage
    dropped: dict[str, list[str]] = {}
    for hf_name in sorted(names):
        if hf_name in alias_hf:
            continue  # a saved copy of a tied weight
        spellings = (hf_name, family.hf_prefix + hf_name)  # a base-model checkpoint lacks the prefix
        reason = next(
            (r for pattern, r in family.ignored_weights.items() if any(re.search(pattern, n) for n in spellings)),
            None,
        )
        if reason is None:
            problems.append(f"unexpected {hf_name}")
        else:
            dropped.setdefault(reason, []).append(hf_name)
    if problems:
        shown = problems[:12] + ([f"and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise ConversionError(
            f"The weights in {source!r} do not fit a {family.model_type} model of its config.json: "
            f"{'; '.join(shown)}. The checkpoint holds another architecture, or a variant this table does not cover."
        )
    notes.extend(f"dropped {', '.join(names_)}: {reason}" for reason, names_ in dropped.items())
    return _assign(model, family, config, state, aliases)


def _assign(
    model: nn.Module, family: Family, config: dict[str, Any], state: dict[str, Tensor], aliases: dict[str, str]
) -> nn.Module:
    model.load_state_dict(state, strict=False, assign=True)
    for alias, target in aliases.items():
        _set_parameter(model, alias, model.get_parameter(target))
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a plugin computes a buffer in __init__: build for real and copy the weights in
        model = family.model_class.from_config(config)
        model.load_state_dict(state, strict=False)
    return model.eval()


def _set_parameter(model: nn.Module, name: str, parameter: nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, parameter)


def _plan(
    family: Family, canonical: list[str], aliases: dict[str, str], config: Mapping[str, Any]
) -> tuple[list[tuple[str, tuple[str, ...], Weight]], set[str]]:
    """[(HF name, our names, rule)] covering every canonical name once; and the HF names of tied aliases."""
    plan, covered, alias_hf = [], set(), set()
    for name in [*canonical, *aliases]:
        if name in covered:
            continue
        match = _match(family, name, config)
        if match is None:
            if name in aliases:
                continue
            raise ConversionError(
                f"The {family.model_type} table has no Hugging Face name for our weight {name!r}; the table is "
                "incomplete for this model (please report it)."
            )
        hf_name, ours, weight = match
        if name in aliases:
            alias_hf.add(hf_name)
            continue
        plan.append((hf_name, ours, weight))
        covered.update(ours)
    return plan, alias_hf


def _match(family: Family, name: str, config: Mapping[str, Any]) -> tuple[str, tuple[str, ...], Weight] | None:
    for weight in family.weights:
        if weight.when is not None and not weight.when(config):
            continue
        for pattern in weight.our_names:
            found = _pattern(pattern).fullmatch(name)
            if found:
                groups = found.groupdict()
                return weight.hf.format(**groups), tuple(p.format(**groups) for p in weight.our_names), weight
    return None


def _hf_names(hf_name: str, weight: Weight) -> list[str]:
    """The HF name of a planned weight and its aliases, with the same layer/expert indices."""
    if not weight.aliases:
        return [hf_name]
    found = _pattern(weight.hf).fullmatch(hf_name)
    groups = found.groupdict() if found else {}
    return [hf_name, *(alias.format(**groups) for alias in weight.aliases)]


def _pattern(pattern: str) -> re.Pattern:
    escaped = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(escaped)


def _normalised_names(family: Family, handles: Mapping[str, Any], expected: set[str]) -> dict[str, str]:
    """{name as the table spells it: name in the file}; legacy renames, a missing base-model prefix added."""
    names = {}
    for raw in handles:
        name = raw
        for old, new in family.weight_renames:
            if name.endswith(old):
                name = name[: -len(old)] + new
        if name not in expected and family.hf_prefix + name in expected:
            name = family.hf_prefix + name
        names[name] = raw
    return names


def _to_ours(tensor: Tensor, weight: Weight, shapes: list[torch.Size]) -> list[Tensor | None]:
    """HF tensor -> our tensor(s): transpose a Conv1D matrix, split a fused one."""
    if weight.transpose:
        if tensor.dim() != 2:
            return [None] * len(shapes)
        tensor = tensor.t()
    if len(shapes) == 1:
        return [tensor]
    sizes = [shape[weight.split_dim] if len(shape) > weight.split_dim else 0 for shape in shapes]
    if tensor.dim() <= weight.split_dim or tensor.shape[weight.split_dim] != sum(sizes):
        return [None] * len(shapes)
    return list(tensor.split(sizes, dim=weight.split_dim))


def _read_tokenizer(hf_dir: Path, hf_config: Mapping[str, Any], notes: list[str]) -> Tokenizer | None:
    """An HFTokenizer over ``tokenizer.json``, its roles from the HF tokenizer files or the config's ids."""
    if not (hf_dir / TOKENIZER).is_file():
        notes.append(f"no {TOKENIZER} in the folder: the export has no tokenizer")
        return None
    from lightningllm_plugins.tokenizer.hf_tokenizer import HFTokenizer  # a plugin, imported when needed

    roles = hf_special_tokens(hf_dir)
    tokenizer = HFTokenizer(path=str(hf_dir / TOKENIZER))
    for role in ROLES:
        token_id = hf_config.get(f"{role}_token_id")
        if role not in roles and isinstance(token_id, int):
            token = tokenizer.backend.id_to_token(token_id)
            if token is not None:
                roles[role] = token
    return HFTokenizer(path=str(hf_dir / TOKENIZER), special_tokens=roles)


def hf_special_tokens(hf_dir: Path) -> dict[str, str]:
    """Role -> token text from HF's ``special_tokens_map.json`` and ``tokenizer_config.json``.

    BERT-style [CLS] and [SEP] take the bos and eos roles when no bos or eos token is named.
    """
    found: dict[str, Any] = {}
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):
        path = hf_dir / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except ValueError:
                continue
            if isinstance(data, dict) and "class_path" not in data:  # not a lightningllm tokenizer config
                found.update({k: v for k, v in data.items() if k.endswith("_token") and v is not None})
    roles = {}
    for role, fallback in (("pad", None), ("unk", None), ("bos", "cls"), ("eos", "sep"), ("mask", None)):
        value = found.get(f"{role}_token", found.get(f"{fallback}_token") if fallback else None)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            roles[role] = value
    return roles


# --- lightningllm -> Hugging Face ------------------------------------------------------------


def to_hf(
    export_dir: str | os.PathLike, hf_dir: str | os.PathLike, *, family: str | None = None, trust_code: bool = False
) -> Conversion:
    """Convert a lightningllm export folder into a folder ``transformers`` loads with ``from_pretrained``.

    Args:
        export_dir: written by :func:`lightningllm.io.export` or :func:`from_hf`.
        hf_dir: the folder to write (replaced atomically if it exists): ``config.json``,
            ``model.safetensors`` and, for a tokenizer built on HF ``tokenizers``, ``tokenizer.json``
            with ``tokenizer_config.json``.
        family: the HF ``model_type`` to write; None: the first table that represents the model exactly.
        trust_code: import any class the export's config names (see :func:`lightningllm.io.load`).

    Raises:
        ConversionError: no table represents the model exactly; the message says why for each.
        WriteError: ``hf_dir`` holds files that are not a folder this function wrote.
    """
    HF_FOLDER.check(Path(hf_dir))  # before the conversion's work, not after
    model, tokenizer = load(export_dir, trust_code=trust_code)
    table, hf_config = _export_family(model, family, str(export_dir))
    canonical, aliases = canonical_names(model)
    plan, _ = _plan(table, canonical, aliases, model.config)
    state = model.state_dict()
    base = table.base_architecture is not None and hf_config.get("architectures") == [table.base_architecture]
    tensors = {}
    for hf_name, ours, weight in plan:
        tensor = _to_hf(state, ours, weight)
        for i, name in enumerate(_hf_names(hf_name, weight)):
            name = name.removeprefix(table.hf_prefix) if base else name  # a base model's own names
            tensors[name] = tensor if i == 0 else tensor.clone()  # safetensors stores no shared tensors
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    hf_config = {
        "architectures": [table.architecture],
        "model_type": table.model_type,
        **hf_config,
        # the tokenizer's ids, except that an id it lacks leaves the one the table wrote (T5's pad)
        **{k: v for k, v in _token_ids(tokenizer).items() if v is not None or k not in hf_config},
        "dtype": str(dtypes.pop() if len(dtypes) == 1 else torch.float32).removeprefix("torch."),
    }
    notes = []
    with atomic_directory(hf_dir, replace=HF_FOLDER) as staging:
        (staging / CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})
        _write_tokenizer(tokenizer, staging, model, notes)
    return Conversion(Path(hf_dir), table.model_type, notes)


def _export_family(model: nn.Module, family: str | None, source: str) -> tuple[Family, dict[str, Any]]:
    """The first table whose HF config converts back to exactly this model's config, and that HF config."""
    if family is not None and family not in FAMILIES:
        raise ConversionError(f"family={family!r} is unknown; choose one of {', '.join(FAMILIES)}.")
    candidates = [FAMILIES[family]] if family else [f for f in FAMILIES.values() if f.model_class is type(model)]
    ours = with_plugin_defaults(model.config)
    reasons = []
    for table in candidates:
        if table.model_class is not type(model):
            reasons.append(f"{table.model_type} needs a {table.model.rpartition('.')[2]}")
            continue
        try:
            hf_config = {}
            for entry in table.fields:
                hf_config.update(entry.write(ours))
            with torch.device("meta"):
                back = table.model_class.from_config(our_config(table, hf_config, source=source)).config
        except (Unsupported, ConversionError, ConfigError) as err:
            reasons.append(f"{table.model_type}: {err}")
            continue
        except KeyError as err:  # our config lacks a knob this family's plugins have
            reasons.append(f"{table.model_type} needs the knob {err.args[0]} that this model's plugins lack")
            continue
        differ = _differences(ours, with_plugin_defaults(back))
        if not differ:
            return table, hf_config
        reasons.append(f"{table.model_type} cannot express {'; '.join(differ[:4])}")
    raise ConversionError(
        f"No Hugging Face family represents the {type(model).__name__} in {source!r} exactly: "
        f"{' | '.join(reasons) or 'no table converts this model class'}."
    )


def _differences(ours: Mapping[str, Any], back: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths where two configs differ, with both values."""
    out = []
    for key in sorted(set(ours) | set(back), key=str):
        a, b = ours.get(key), back.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}={a!r} (the family has {b!r})")
    return out


def _to_hf(state: Mapping[str, Tensor], ours: tuple[str, ...], weight: Weight) -> Tensor:
    tensor = torch.cat([state[name] for name in ours], dim=weight.split_dim) if len(ours) > 1 else state[ours[0]]
    if weight.transpose:
        tensor = tensor.t()
    return tensor.detach().contiguous()


def _roles(tokenizer: Tokenizer) -> dict[str, str]:
    roles = getattr(tokenizer, "special_tokens", None)
    if isinstance(roles, Mapping):
        return {role: token for role, token in roles.items() if token is not None}
    return dict(zip(ROLES, SPECIAL_TOKENS))


def _token_ids(tokenizer: Tokenizer | None) -> dict[str, int | None]:
    ids: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is None:
        return ids
    for role in ("bos", "eos", "pad"):
        try:
            ids[f"{role}_token_id"] = getattr(tokenizer, f"{role}_id")
        except Exception:  # noqa: BLE001 - a role the tokenizer does not have
            ids[f"{role}_token_id"] = None
    return ids


def _write_tokenizer(tokenizer: Tokenizer | None, staging: Path, model: nn.Module, notes: list[str]) -> None:
    if tokenizer is None:
        notes.append("the export has no tokenizer: none written")
        return
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        notes.append(
            f"{type(tokenizer).__name__} is not built on HF tokenizers: no {TOKENIZER} written (the ids stay valid)"
        )
        return
    backend.save(str(staging / TOKENIZER))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": getattr(model, "max_seq_len", None)}
    config.update({f"{role}_token": token for role, token in _roles(tokenizer).items()})
    (staging / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
