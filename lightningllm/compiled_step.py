"""The one-token decoding step over a static KV cache, compiled once per model, batch size and cache length.

Eager decoding reads a cache that grows by one slot per token, so every step has new shapes. Here each
layer's :class:`~lightningllm.cache.KVCache` keeps all its slots in play (:meth:`~lightningllm.cache.KVCache.
make_static`): the new token is written at a slot held in a tensor and the mask hides the slots after it and
any left padding, so one graph serves every token and every prompt length (gpt-fast; Hugging Face's
``StaticCache``). On CUDA the graph is captured as a CUDA graph (``mode="reduce-overhead"``): one launch per
token instead of one per kernel. Cache lengths round up to a power of two, so a new prompt length compiles
again only when it crosses one.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch._inductor.config
from torch import Tensor, nn

from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask

#: what ``torch.compile`` lowers the captured graph with (tests use "eager": the same capture, no code generation).
BACKEND = "inductor"

#: model -> {(batch size, cache length, dtype, device): its compiled step}; dies with the model.
_STEPS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, CompiledStep]] = weakref.WeakKeyDictionary()


def compiled_step(model: nn.Module, batch_size: int, window: int) -> CompiledStep:
    """The model's compiled step for ``batch_size`` rows and a cache of at least ``window`` slots (reused)."""
    check_static(model)
    length = _bucket(window, getattr(model, "max_seq_len", None))
    weight = next(model.parameters())
    key = (batch_size, length, weight.dtype, weight.device)
    steps = _STEPS.setdefault(model, {})
    if key not in steps or steps[key].stale():
        steps[key] = CompiledStep(model, batch_size, length)
    return steps[key]


def weights_version(model: nn.Module) -> int:
    """A number that grows whenever any parameter is written in place (an optimizer step, ``load_state_dict``)."""
    return sum(p._version for p in model.parameters())


class CompiledStep:
    """Decode one token for every row: ``torch.compile`` of the model's forward over its static cache.

    Use: fill :attr:`cache` with the prompt in its append mode (an ordinary forward), call :meth:`start`,
    then call the step once per token.

    Args:
        model: a decoder whose attention layers read key positions from the mask (``static_cache``).
        batch_size: B.
        max_len: S, the cache's slots.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_len: int) -> None:
        self.model = weakref.ref(model)  # _STEPS holds this step as long as the model lives, not longer
        self.cache = model.make_cache(batch_size, max_len)
        self.slot = torch.zeros(1, dtype=torch.long, device=self.cache[0].k.device)  # where the new token goes
        cuda = self.slot.device.type == "cuda"
        if cuda:  # CUDA graphs replay fixed addresses: the caches are written in place, never copied
            for layer in self.cache:
                torch._dynamo.mark_static_address(layer.k)
                torch._dynamo.mark_static_address(layer.v)
        mode = "reduce-overhead" if cuda and BACKEND == "inductor" else None
        # on a CPU, inductor's freezing folds the weights into the graph as constants and prepacks them for the
        # one-row matmuls of decoding (1.6x the tokens/s of aten's here); the graph then holds a copy of the
        # weights, so a step is rebuilt once they change (stale)
        self.frozen = not cuda and BACKEND == "inductor"
        self.version = weights_version(model)
        compile_step = torch.compile(_forward, backend=BACKEND, mode=mode, dynamic=False, fullgraph=True)
        self._step = _with_freezing(compile_step) if self.frozen else compile_step

    def stale(self) -> bool:
        """Whether the model's weights changed since a frozen graph copied them."""
        model = self.model()
        return self.frozen and (model is None or weights_version(model) != self.version)

    def start(self) -> None:
        """Keep the slots the prompt filled and write each new token at :attr:`slot` from now on."""
        for layer in self.cache:
            layer.make_static(self.slot)

    def __call__(self, ids: Tensor, slot: int, positions: Tensor, key_positions: Tensor) -> Tensor:
        """Feed one token per row -> its logits (B, V).

        Args:
            ids: (B, 1) the newest tokens.
            slot: the cache slot they take.
            positions: (B, 1) their positions.
            key_positions: (B, S) the position of every slot's key; negative at left padding (hidden).
        """
        self.slot.fill_(slot)
        return self._step(self.model(), self.cache, ids, positions, key_positions, self.slot)


def _with_freezing(step: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``step`` compiled (on its first call) with inductor's freezing on, and the global setting left as it was."""

    def frozen(*args) -> Tensor:
        with torch._inductor.config.patch(freezing=True):
            return step(*args)

    return frozen


def _forward(
    model: nn.Module, cache: list, ids: Tensor, positions: Tensor, key_positions: Tensor, slot: Tensor
) -> Tensor:
    """What is compiled: the model's forward over its static cache -> logits of the one new token per row, (B, V)."""
    for layer in cache:  # the slot is an input of the graph, never a constant folded into it
        layer.slots = slot
    mask = AttentionMask(causal=True, padding=key_positions >= 0, key_positions=key_positions)
    return model(ids, cache=cache, mask=mask, positions=positions)[:, -1]


def check_static(model: nn.Module) -> None:
    """Refuse, with the reason, a model whose cache or attention cannot decode over fixed shapes."""
    blocks = getattr(model, "blocks", None)
    # read from each class itself, not inherited: a subclass that attends otherwise (sliding window) must opt in
    fits = (
        blocks is not None
        and all(vars(type(blk.attention)).get("static_cache", False) for blk in blocks)
        and not hasattr(model.embed, "soft_tokens")  # prompt tuning's virtual tokens shift the positions
    )
    if not fits:
        raise ConfigError(
            f"Compiled decoding runs decoders whose every attention layer reads its keys' positions from the "
            f"mask over a static cache (MultiHeadAttention, with or without LoRA-style adapters); "
            f"{type(model).__name__} has other layers (sliding-window, latent or linear attention, prefix or prompt "
            "tuning, or an encoder-decoder). Decode it without compile."
        )


def _bucket(window: int, max_seq_len: int | None) -> int:
    """The cache length for ``window`` positions: the next power of two from 16, at most ``max_seq_len``."""
    length = 16
    while length < window:
        length *= 2
    return length if max_seq_len is None else max(window, min(length, max_seq_len))
