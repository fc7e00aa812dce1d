"""Weight-only int8 / int4 quantisation of linear layers for inference, through torchao.

Each targeted ``nn.Linear`` becomes a :class:`WeightOnlyQuantizedLinear` whose weight is a torchao quantised
tensor (``Int8Tensor`` for 8 bits, ``IntxUnpackedToInt8Tensor`` for 4): integer values ``q`` with a scale ``s``
and zero point ``z`` per group of ``group_size`` input weights of a row (a whole row by default), so that
``w ~ (q - z) * s`` and ``|w - (q - z) * s| <= s / 2`` for every weight (round to nearest; Jacob et al., 2018,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"). Activations stay
in floating point; torchao dequantises (or runs an int8 kernel) inside ``F.linear``.

The state dict holds plain tensors that safetensors writes and loading reads without pickle: ``weight_qdata``
(int8, or for 4 bits uint8 holding two values per byte, so the file really is smaller), ``weight_scale`` and
``weight_zero_point``; loading puts them back into the torchao tensor. The transform is recorded in the model's
config, so ``export`` -> ``load`` rebuilds the quantised model and every command that loads an export (``generate``,
``evaluate``) uses it unchanged.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightningllm.contracts import Head, Transform
from lightningllm.errors import ConfigError, LightningLLMError
from lightningllm.registry import register
from lightningllm_plugins.adapter.lora import _matches, _shared_parameters

log = logging.getLogger(__name__)

BITS = (8, 4)
#: the projections every plugin names alike (the head is left in floating point)
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INNER = ("qdata", "scale", "zero_point")  # the torchao tensor's inner tensors (its __tensor_flatten__ names)


class WeightOnlyQuantizedLinear(nn.Module):
    """``y = x @ dequant(W)^T + b`` with ``W`` a torchao weight-only quantised tensor; frozen (inference only).

    Args:
        linear: the float layer to quantise (its weight and bias are read, not kept).
        bits: 8 or 4.
        group_size: input weights per scale (None: one scale per output row).
    """

    def __init__(self, linear: nn.Linear, bits: int, group_size: int | None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size = bits, group_size
        weight = quantized_weight(linear.weight.detach(), bits, group_size)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        return F.linear(x, self.weight, self.bias)

    def dequantized_weight(self) -> Tensor:
        """(out_features, in_features): the float weight the layer computes with."""
        return self.weight.dequantize()

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        qdata, scale, zero_point = (getattr(self.weight, name) for name in INNER)
        destination[prefix + "weight_qdata"] = pack_int4(qdata) if self.bits == 4 else qdata
        destination[prefix + "weight_scale"] = scale
        destination[prefix + "weight_zero_point"] = zero_point
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool, missing_keys: list,
        unexpected_keys: list, error_msgs: list,
    ) -> None:  # fmt: skip
        ours = {name: prefix + name for name in self._state_names()}
        missing_keys.extend(key for key in ours.values() if key not in state_dict)
        if strict:
            unexpected_keys.extend(
                key for key in state_dict if key.startswith(prefix) and "." not in key[len(prefix) :]
                and key not in ours.values()
            )  # fmt: skip
        if any(key not in state_dict for key in ours.values()):
            return
        current = self.state_dict()
        wrong = [f"{key}: {tuple(state_dict[key].shape)} vs {tuple(current[name].shape)}"
                 for name, key in ours.items() if state_dict[key].shape != current[name].shape]  # fmt: skip
        if wrong:
            error_msgs.append(f"size mismatch for {', '.join(wrong)}")
            return
        qdata = state_dict[prefix + "weight_qdata"]
        inner = {
            "qdata": unpack_int4(qdata, self.in_features) if self.bits == 4 else qdata.to(torch.int8),
            "scale": state_dict[prefix + "weight_scale"],
            "zero_point": state_dict[prefix + "weight_zero_point"],
        }
        with torch.no_grad():
            like = {n: getattr(self.weight, n) for n in INNER}
            inner = {n: t.to(device=like[n].device, dtype=like[n].dtype).clone() for n, t in inner.items()}
            _, context = self.weight.__tensor_flatten__()
            weight = type(self.weight).__tensor_unflatten__(inner, context, self.weight.shape, self.weight.stride())
            self.weight = nn.Parameter(weight, requires_grad=False)
            if self.bias is not None:
                self.bias.copy_(state_dict[prefix + "bias"])

    def _state_names(self) -> list[str]:
        return ["weight_qdata", "weight_scale", "weight_zero_point"] + (["bias"] if self.bias is not None else [])

    def extra_repr(self) -> str:
        group = "row" if self.group_size is None else self.group_size
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group={group}"


@register("transform")
class WeightOnlyQuantization(Transform):
    """Weight-only int8/int4 quantisation (torchao) of the linear layers named by ``targets``, for inference.

    Args:
        bits: 8 (int8, about 4x smaller than fp32) or 4 (int4 packed two per byte, about 6x smaller with groups
            of 32).
        group_size: input weights that share one scale and zero point (e.g. 32; it must divide every target's
            in_features); None gives one per output row. Smaller groups follow the weights more closely and cost
            more scales; 4 bits usually need groups.
        targets: module-name patterns: a plain name matches the last part of a module's name (``q_proj``), a shell
            glob matches the full name (``blocks.0.*``). Default: every projection of the blocks (the head and
            embeddings stay in floating point).
    """

    def __init__(self, bits: Literal[8, 4] = 8, group_size: int | None = None, targets: list[str] | None = None):
        targets = list(targets) if targets is not None else list(DEFAULT_TARGETS)
        _check_options(bits, group_size, targets)
        self.bits, self.group_size, self.targets = bits, group_size, targets
        self.config = {"bits": bits, "group_size": group_size, "targets": targets}

    def apply(self, model: nn.Module) -> None:
        """Replace every targeted ``nn.Linear`` of ``model`` by a :class:`WeightOnlyQuantizedLinear`."""
        layers = self._matching_layers(model)
        shared = _shared_parameters(model)
        for name, layer in layers:
            self._check_fits(name, layer, shared)
        for name, layer in layers:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, WeightOnlyQuantizedLinear(layer, self.bits, self.group_size))
        group = "a whole row" if self.group_size is None else self.group_size
        log.info("WeightOnlyQuantization: %d linear layers to int%d (group %s)", len(layers), self.bits, group)

    def _matching_layers(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]
        found = [(name, layer) for name, layer in linears if _matches(name, self.targets)]
        if not found:
            names = sorted({name.rsplit(".", 1)[-1] for name, _ in linears})
            raise ConfigError(
                f"WeightOnlyQuantization targets {self.targets} match no linear layer of {type(model).__name__}. Its "
                f"linear layers are named {', '.join(names) or '(none)'}; give plain names (q_proj, up_proj) or shell "
                "globs over full module names (blocks.0.*)."
            )
        return found

    def _check_fits(self, name: str, layer: nn.Linear, shared: set[int]) -> None:
        if isinstance(layer, Head) or id(layer.weight) in shared:
            raise ConfigError(
                f"WeightOnlyQuantization targets {name}, a head or a layer whose weight another module shares (a "
                "head tied to the token embedding); it stays in floating point. Target the block projections "
                f"({', '.join(DEFAULT_TARGETS)})."
            )
        if self.group_size is not None and layer.in_features % self.group_size:
            raise ConfigError(
                f"WeightOnlyQuantization group_size={self.group_size} does not divide the {layer.in_features} input "
                f"features of {name}: give a divisor of every target's in_features (e.g. 32), or null for one scale "
                "per row."
            )


def _check_options(bits: Any, group_size: Any, targets: Any) -> None:
    if bits not in BITS or isinstance(bits, bool):
        raise ConfigError(
            f"WeightOnlyQuantization bits={bits!r} is not supported: choose 8 (int8) or 4 (int4, packed two per byte)."
        )
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2):
        raise ConfigError(
            f"WeightOnlyQuantization group_size={group_size!r} must be an integer >= 2 (input weights per scale, "
            "e.g. 32) or null for one scale per output row."
        )
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(
            f"WeightOnlyQuantization targets={targets!r} must be a non-empty list of module-name patterns, e.g. "
            f"{DEFAULT_TARGETS}."
        )


def quantized_weight(weight: Tensor, bits: int, group_size: int | None) -> Tensor:
    """The torchao weight-only quantised tensor of ``weight`` (out_features, in_features); symmetric mapping."""
    quantization = _import_torchao()
    group = quantization.PerGroup(group_size) if group_size else None
    if bits == 8:  # Int8Tensor: torchao's int8 weight-only kernel path
        config = quantization.Int8WeightOnlyConfig(granularity=group or quantization.PerRow())
    else:  # int4 values held unpacked in int8 (the packed int4 layouts need CUDA); pack_int4 packs them on disk
        granularity = group or quantization.PerAxis(0)
        config = quantization.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=granularity)
    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    holder.weight = nn.Parameter(weight.clone(), requires_grad=False)
    quantization.quantize_(holder, config)
    return holder.weight.data


def pack_int4(qdata: Tensor) -> Tensor:
    """(out, in) int8 values in [-8, 7] -> (out, ceil(in / 2)) uint8: column 2j in the low nibble, 2j+1 high."""
    nibbles = (qdata.to(torch.int16) + 8).to(torch.uint8)
    if nibbles.shape[-1] % 2:
        nibbles = F.pad(nibbles, (0, 1))
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: Tensor, in_features: int) -> Tensor:
    """The inverse of :func:`pack_int4`: (out, ceil(in / 2)) uint8 -> (out, in) int8 in [-8, 7]."""
    packed = packed.to(torch.uint8)
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)  # (out, 2 * ceil(in / 2))
    return (nibbles[..., :in_features].to(torch.int16) - 8).to(torch.int8)


def _import_torchao():
    """``torchao.quantization``, with torchao's import-time notes (CUDA kernels absent on CPU) kept off the log."""
    try:
        with _quiet("torchao", "torch.utils._pytree"):
            import torchao.quantization as quantization
    except ImportError:
        raise LightningLLMError(
            "WeightOnlyQuantization quantises through torchao, which is not installed: "
            "pip install 'lightningllm[quantize]' (torchao)."
        ) from None
    return quantization


@contextmanager
def _quiet(*names: str):
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
