"""QLoRA: LoRA beside a frozen base stored in 4-bit NormalFloat (Dettmers et al., 2023, "QLoRA: Efficient Finetuning
of Quantized LLMs").

The weight of each targeted linear is replaced by torchao's ``NF4Tensor``: the weight is cut into blocks of
``block_size`` values, each stored as 4-bit indices into the 16 NF4 levels times the block's absmax; the absmaxes
are quantised again (double quantisation: 8-bit, less their mean, in blocks of ``scaler_block_size``). The layer
dequantises on the fly (``F.linear`` on an ``NF4Tensor``), and the LoRA update runs in the compute precision
(LoRA's A and B keep the dtype of the base weight). Everything else (targets, rank, scaling, several named
adapters, switching, adapter-only weights) is LoRA's: :class:`QLoRALinear` is a :class:`LoRALinear` whose base
weight is NF4.

State dicts (checkpoints, exports) hold the NF4 parts of each quantised weight, not a dense copy:
``base_layer.weight_nf4_data`` (uint8, two indices a byte), ``_nf4_scalers`` (int8), ``_nf4_factors`` and
``_nf4_mean``; loading copies them back bit for bit, so export -> load reproduces the model exactly (quantising
a dequantised weight again would not: the absmaxes round differently). ``merge_and_unload`` dequantises:
it gives a plain model (dense weights plus the merged update) that :func:`lightningllm.io.export` writes.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from lightningllm.contracts import Head
from lightningllm.errors import ConfigError
from lightningllm.registry import register
from lightningllm_plugins.adapter.lora import LoRA, LoRALinear, _shared_parameters

#: state-dict suffix of each NF4 part -> the NF4Tensor attribute holding it
NF4_PARTS = {"_nf4_data": "quantized_data", "_nf4_scalers": "quantized_scalers",
             "_nf4_factors": "quantization_factor", "_nf4_mean": "scaler_mean"}  # fmt: skip


def nf4_module() -> Any:
    """torchao's NF4 module, or a :class:`ConfigError` saying which extra installs it."""
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError:
        raise ConfigError(
            "QLoRA stores base weights in NF4 through torchao, which is not installed: pip install "
            "'lightningllm[qlora]' (or use LoRA)."
        ) from None
    return nf4_tensor


def is_nf4(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a torchao ``NF4Tensor`` (without importing torchao when it is not loaded)."""
    return type(tensor).__name__ == "NF4Tensor"


def nf4_bytes(tensor: Tensor) -> int:
    """Bytes of storage an ``NF4Tensor`` holds: its 4-bit data, 8-bit scalers, their factors, mean and level table."""
    parts = [getattr(tensor, attr) for attr in [*NF4_PARTS.values(), "nf4"]]
    return sum(part.untyped_storage().nbytes() for part in parts)


class QLoRALinear(LoRALinear):
    """A :class:`LoRALinear` whose frozen base weight is an ``NF4Tensor``: ``y = dequant(W) x + b + LoRA(x)``.

    Args:
        base_layer: the linear it wraps; :meth:`quantize_base` puts its weight in NF4.
    """

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self._nf4_weight: Tensor | None = None  # the NF4 weight while a merge has put a dense copy in its place
        self.register_state_dict_post_hook(_nf4_parts_to_state)
        self.register_load_state_dict_pre_hook(_nf4_parts_from_state)

    def quantize_base(self, block_size: int, scaler_block_size: int) -> None:
        """Replace the base weight (out_features, in_features) by its NF4 form, frozen."""
        weight = self.base_layer.weight.detach()
        nf4 = nf4_module().to_nf4(weight.contiguous(), block_size, scaler_block_size)
        for attr in NF4_PARTS.values():  # torchao may leave a part as a view of a larger buffer: keep only the part
            setattr(nf4, attr, getattr(nf4, attr).clone())
        self.base_layer.weight = nn.Parameter(nf4, requires_grad=False)

    def merge(self) -> None:
        """Dequantise the base weight, then fold the active adapters into it as LoRA does."""
        if self._nf4_weight is None:
            self._nf4_weight = self.base_layer.weight
            dense = self._nf4_weight.get_original_weight()
            self.base_layer.weight = nn.Parameter(dense, requires_grad=False)
        super().merge()

    def unmerge(self) -> None:
        """Put the untouched NF4 weight back (exact: no subtraction, no second quantisation)."""
        if self._nf4_weight is not None:
            self.base_layer.weight = self._nf4_weight
            self._nf4_weight = None
        self.merged.clear()


class QLoRAHead(QLoRALinear, Head):
    """A :class:`QLoRALinear` around a linear head, so the model's ``head`` slot still holds a :class:`Head`."""


def _nf4_parts_to_state(module: QLoRALinear, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook: the NF4 weight goes out as its plain parts (safetensors and checkpoints store them)."""
    key = f"{prefix}base_layer.weight"
    if key in state and is_nf4(state[key]):
        weight = state.pop(key)
        for suffix, attr in NF4_PARTS.items():
            state[key + suffix] = getattr(weight, attr)


def _nf4_parts_from_state(module: QLoRALinear, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load hook: NF4 parts in ``state`` become one ``NF4Tensor``, which the base layer copies bit for bit."""
    key = f"{prefix}base_layer.weight"
    found = {suffix: state.pop(key + suffix) for suffix in NF4_PARTS if key + suffix in state}
    weight = module.base_layer.weight
    if len(found) == len(NF4_PARTS) and is_nf4(weight):
        parts = {attr: found[suffix].to(getattr(weight, attr).dtype) for suffix, attr in NF4_PARTS.items()}
        nf4 = nf4_module()
        state[key] = nf4.NF4Tensor(*nf4.construct_nf4_args(weight, parts))
    else:  # a part missing, or a dense weight here: leave them for load_state_dict's own checks to name
        state.update({key + suffix: value for suffix, value in found.items()})


@register("adapter")
class QLoRA(LoRA):
    """LoRA on the linear layers named by ``targets``, whose frozen weights are stored in NF4.

    The LoRA options are LoRA's (see :class:`~lightningllm_plugins.adapter.lora.LoRA`). Each targeted weight
    (out_features x in_features values) must split into whole blocks: a multiple of
    ``block_size * scaler_block_size`` values.

    Args:
        rank: r, the rank of each update.
        alpha: the update is scaled by alpha / r (alpha / sqrt(r) with ``rslora``).
        targets: module-name patterns (plain names or shell globs over full names).
        dropout: dropout on the adapter's input.
        rslora: scale by alpha / sqrt(r).
        init: ``kaiming`` or ``gaussian`` for A; B starts at zero.
        name: the adapter's name.
        block_size: values sharing one absmax (the paper's 64).
        scaler_block_size: absmaxes sharing one 8-bit quantisation factor (the paper's 256).
    """

    layer_class = QLoRALinear
    head_class = QLoRAHead

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        targets: list[str] | None = None,
        dropout: float = 0.0,
        rslora: bool = False,
        init: Literal["kaiming", "gaussian"] = "kaiming",
        name: str = "default",
        block_size: int = 64,
        scaler_block_size: int = 256,
    ) -> None:
        super().__init__(rank, alpha, targets, dropout, rslora, init, name)
        for option, value in (("block_size", block_size), ("scaler_block_size", scaler_block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % 2:
                raise ConfigError(
                    f"QLoRA {option}={value!r} is not a positive even integer: give the number of values that "
                    "share one scale (the QLoRA paper uses block_size 64 and scaler_block_size 256)."
                )
        nf4_module()  # a missing torchao is refused when the config is read, not after the model is built
        self.block_size, self.scaler_block_size = block_size, scaler_block_size
        self.config.update(block_size=block_size, scaler_block_size=scaler_block_size)

    def _wrap(self, model: nn.Module, name: str, layer: nn.Linear) -> LoRALinear:
        wrapper = super()._wrap(model, name, layer)
        wrapper.quantize_base(self.block_size, self.scaler_block_size)
        return wrapper

    def apply(self, model: nn.Module) -> None:
        """Quantise every targeted linear's weight to NF4 and add this LoRA adapter beside it."""
        shared = _shared_parameters(model)
        for name, layer in self._matching_layers(model):
            self._check_quantizable(name, layer, shared)
        super().apply(model)

    def _check_quantizable(self, name: str, layer: nn.Module, shared: set[int]) -> None:
        if isinstance(layer, LoRALinear) and not isinstance(layer, QLoRALinear):
            raise ConfigError(
                f"{name} already holds LoRA adapters ({', '.join(layer.adapter_names())}) over a dense weight; "
                "QLoRA quantises the base weight when it wraps a layer. Apply QLoRA first (a LoRA applied after "
                "it adds to the same NF4 layer), or target other layers."
            )
        if isinstance(layer, QLoRALinear):
            held = layer.base_layer.weight
            if (held.block_size, held.scaler_block_size) != (self.block_size, self.scaler_block_size):
                raise ConfigError(
                    f"{name} is already stored in NF4 with block_size {held.block_size} and scaler_block_size "
                    f"{held.scaler_block_size}; a second QLoRA adapter on it must give the same block sizes."
                )
            return
        weight = layer.weight
        if weight.is_meta:
            raise ConfigError(
                f"QLoRA cannot quantise {name}: its weight is on the meta device (a model built for FSDP), so "
                "there are no values to store in NF4. Give the model start_weights (they replace the meta "
                "tensors before the transforms), or build it on a real device."
            )
        if id(weight) in shared:
            raise ConfigError(
                f"QLoRA cannot quantise {name}: its weight is shared with another module (a head tied to the "
                "token embedding), which would then read 4-bit values too. Target untied layers only."
            )
        group = self.block_size * self.scaler_block_size
        if weight.numel() % group:
            raise ConfigError(
                f"QLoRA cannot quantise {name}: its {tuple(weight.shape)} weight ({weight.numel()} values) does "
                f"not split into blocks of block_size * scaler_block_size = {self.block_size} * "
                f"{self.scaler_block_size} = {group} values. Choose sizes whose product divides {weight.numel()}, "
                "or target other layers."
            )
