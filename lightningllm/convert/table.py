"""The declarative pieces a family table is made of, and the small helpers tables share.

A family table (:class:`Family`) says, for one Hugging Face ``model_type``:

- which of our model classes it becomes and the fixed part of that model's config (``skeleton``:
  plugin classes and knobs the family never changes);
- for every field of HF's ``config.json``: where it goes in our config (:class:`Field`), the one
  value we support (:class:`Fixed`), a rule over several fields (:class:`Rule`), or why it does not
  change the computation (:class:`Ignored`). A field no entry names is refused by name;
- how each weight is named on both sides and how it is transformed (:class:`Weight`).

The generic engine in :mod:`lightningllm.convert.hf` applies a table in both directions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lightningllm.config import resolve
from lightningllm.errors import ExportError

_ABSENT = object()


class ConversionError(ExportError):
    """A checkpoint or export that cannot be converted exactly; the message names what and why."""


class Unsupported(Exception):
    """Raised by a table's converter for a value it cannot represent; the engine collects the messages."""


@dataclass(frozen=True)
class Field:
    """One HF config field that maps onto one value of our model config.

    Args:
        hf: the field's name in ``config.json``.
        ours: dotted path in our config, e.g. ``dim`` or ``norm.init_args.eps``.
        default: HF's value when the field is absent (the HF config class's default).
        to_ours: converts the HF value (identity when None); may raise :class:`Unsupported`.
        to_hf: converts our value back (identity when None); may raise :class:`Unsupported`.
    """

    hf: str
    ours: str
    default: Any = None
    to_ours: Callable[[Any], Any] | None = None
    to_hf: Callable[[Any], Any] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return (self.hf,)

    def read(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        value = hf.get(self.hf, self.default)
        return {self.ours: self.to_ours(value) if self.to_ours else value}

    def write(self, ours: Mapping[str, Any]) -> dict[str, Any]:
        value = get_path(ours, self.ours)
        return {self.hf: self.to_hf(value) if self.to_hf else value}


@dataclass(frozen=True)
class Fixed:
    """A field we support at one value only (``value`` is also HF's default); any other value is refused.

    Args:
        hf: the field's name.
        value: the supported value; written back on export.
        reason: why other values cannot be honoured.
    """

    hf: str
    value: Any
    reason: str

    @property
    def names(self) -> tuple[str, ...]:
        return (self.hf,)

    def read(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        found = hf.get(self.hf, self.value)
        if found != self.value and not (isinstance(found, list) and list(found) == self.value):
            raise Unsupported(f"{self.hf}={found!r} (only {self.value!r} is supported: {self.reason})")
        return {}

    def write(self, ours: Mapping[str, Any]) -> dict[str, Any]:
        return {self.hf: self.value}


@dataclass(frozen=True)
class Ignored:
    """A field that does not change what the converted model computes; ``reason`` says why."""

    hf: str
    reason: str

    @property
    def names(self) -> tuple[str, ...]:
        return (self.hf,)

    def read(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def write(self, ours: Mapping[str, Any]) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Rule:
    """Several HF fields that decide several values of ours together (e.g. RoPE's parameters).

    Args:
        fields: the HF fields it reads.
        read: (the whole HF config) -> {our dotted path: value}; raises :class:`Unsupported`.
        write: (our config, plugin defaults filled in) -> {HF field: value}; raises :class:`Unsupported`.
    """

    fields: tuple[str, ...]
    read: Callable[[Mapping[str, Any]], dict[str, Any]]
    write: Callable[[Mapping[str, Any]], dict[str, Any]]

    @property
    def names(self) -> tuple[str, ...]:
        return self.fields


@dataclass(frozen=True)
class Weight:
    """One HF tensor and the tensor(s) of ours it becomes.

    Patterns use ``{i}`` for the layer index and ``{e}`` for the expert index.

    Args:
        hf: the HF name, in the layout of the family's ``architecture`` (with its prefix).
        ours: our parameter name, or several: the HF tensor is then their concatenation along
            ``split_dim`` (in our orientation), e.g. GPT-2's fused ``c_attn`` = q, k, v.
        transpose: HF stores the matrix as (in, out) (GPT-2's ``Conv1D``), ours as (out, in).
        split_dim: the dimension of the concatenation.
        aliases: other HF names of the same tensor (BERT's ``cls.predictions.bias``, which a tied
            checkpoint stores in place of ``cls.predictions.decoder.bias``): on import ``hf`` is read
            when present, else the first alias present; on export the tensor is written under all.
        when: (our model config) -> whether this entry applies, for names whose HF counterpart depends
            on the plugin (T5's ``wi`` is MLP's ``up_proj``, ``wi_1`` the gated unit's); None: always.
    """

    hf: str
    ours: str | tuple[str, ...]
    transpose: bool = False
    split_dim: int = 0
    aliases: tuple[str, ...] = ()
    when: Callable[[Mapping[str, Any]], bool] | None = None

    @property
    def our_names(self) -> tuple[str, ...]:
        return (self.ours,) if isinstance(self.ours, str) else tuple(self.ours)


@dataclass(frozen=True)
class Family:
    """Everything the engine needs to convert one HF ``model_type`` both ways.

    Args:
        model_type: HF's ``model_type``.
        architecture: the HF class written into ``architectures`` on export.
        model: import path of our model class (``lightningllm.models.decoder.Decoder``).
        skeleton: the fixed part of our config (plugin specs, fixed knobs); fields fill in the rest.
        fields: one entry per HF config field (:class:`Field`, :class:`Fixed`, :class:`Ignored`, :class:`Rule`).
        weights: the weight names and their transforms.
        hf_prefix: prefix of the base model's weights (``model.``); checkpoints of the bare base model
            (``LlamaModel``) store them without it.
        ignored_weights: regex -> reason, HF tensors with no counterpart that are dropped on import.
        weight_renames: (old, new) substring renames applied to HF names first (legacy checkpoints).
        from_weights: (the HF tensor names in the checkpoint) -> {our dotted path: value}, applied on import
            after the fields, for what a checkpoint tells by the tensors it stores rather than by its
            config (T5 under transformers 5: a stored ``lm_head.weight`` is an untied head although
            config.json says ``tie_word_embeddings: true``). The fields still decide it on export.
    """

    model_type: str
    architecture: str
    model: str
    skeleton: dict[str, Any]
    fields: tuple[Field | Fixed | Ignored | Rule, ...]
    weights: tuple[Weight, ...]
    hf_prefix: str = ""
    ignored_weights: dict[str, str] = field(default_factory=dict)
    weight_renames: tuple[tuple[str, str], ...] = ()
    from_weights: Callable[[frozenset[str]], dict[str, Any]] | None = None
    base_architecture: str | None = None

    @property
    def model_class(self) -> type:
        module, _, name = self.model.rpartition(".")
        return getattr(__import__(module, fromlist=[name]), name)


# --- helpers for tables -------------------------------------------------------------


def get_path(config: Mapping[str, Any], path: str, default: Any = _ABSENT) -> Any:
    """``config["a"]["b"]`` for ``path="a.b"``; ``default`` (or KeyError) when a key is missing."""
    node: Any = config
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            if default is _ABSENT:
                raise KeyError(path)
            return default
        node = node[key]
    return node


def set_path(config: dict[str, Any], path: str, value: Any) -> None:
    """``config["a"]["b"] = value`` for ``path="a.b"``, creating the dicts on the way."""
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def choice(mapping: dict[Any, Any], name: str) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """``(to_ours, to_hf)`` converters over a finite mapping HF value -> our value (first key wins back)."""
    back: dict[Any, Any] = {}
    for hf_value, our_value in mapping.items():
        back.setdefault(our_value, hf_value)

    def to_ours(value: Any) -> Any:
        if value not in mapping:
            raise Unsupported(f"{name}={value!r} (supported: {', '.join(map(repr, mapping))})")
        return mapping[value]

    def to_hf(value: Any) -> Any:
        if value not in back:
            raise Unsupported(f"{name} has no Hugging Face equivalent of {value!r} (supported: {', '.join(back)})")
        return back[value]

    return to_ours, to_hf


STRUCTURAL = {
    "attention": ("dim", "n_heads", "n_kv_heads", "dropout"),
    "ffn": ("dim", "hidden_dim", "dropout"),
    "norm": ("dim",),
    "position": ("dim", "n_heads", "head_dim", "max_seq_len"),
    "block": ("attention", "ffn", "norm_1", "norm_2", "dropout", "dim"),
}

#: EncoderDecoder slots holding a plugin of another slot's kind.
SECOND_SLOTS = {"cross_attention": "attention", "decoder_position": "position"}


def with_plugin_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of our model config where every plugin spec lists all its knobs (defaults filled in).

    Two configs that build the same model then compare equal, whatever knobs were spelled out.
    """
    out = {key: value for key, value in config.items()}
    for slot, structural in STRUCTURAL.items():
        if isinstance(out.get(slot), Mapping):
            out[slot] = _spec_with_defaults(out[slot], slot, structural)
    for slot, kind in SECOND_SLOTS.items():  # an encoder-decoder's other plugins of the same kinds
        if isinstance(out.get(slot), Mapping):
            out[slot] = _spec_with_defaults(out[slot], kind, STRUCTURAL[kind])
    out["overrides"] = [
        {
            key: _spec_with_defaults(value, key, STRUCTURAL[key]) if key in ("attention", "ffn") else value
            for key, value in override.items()
        }
        for override in out.get("overrides") or []
    ]
    return out


def _spec_with_defaults(spec: Mapping[str, Any], kind: str, structural: tuple[str, ...]) -> dict[str, Any]:
    cls = resolve(spec["class_path"], kind)
    args = {}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", *structural) or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is not parameter.empty:
            args[name] = parameter.default
    args.update(spec.get("init_args") or {})
    return {"class_path": spec["class_path"], "init_args": args}
