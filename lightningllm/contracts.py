"""What each kind of plugin promises: a base class and the factory the model calls.

Notation: B batch, T query positions, S key positions (T plus what a cache holds),
H query heads, Hkv key/value heads, hd head width, dim model width.

Models receive *factories* and pass the structural sizes as keywords, once per layer;
a config carries only each plugin's own knobs. jsonargparse reads the factory
Protocols below as instance factories, so ``attention: {class_path: MultiHeadAttention,
init_args: {qk_norm: true}}`` becomes ``partial(MultiHeadAttention, qk_norm=True)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lightningllm.cache import KVCache
from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask

#: The label that losses skip (padding, prompt tokens, unselected positions); PyTorch's cross-entropy default.
IGNORE_INDEX = -100


class Position(nn.Module):
    """Positional encoding: up to three hooks, each a no-op by default.

    ``positions`` are absolute token positions, (B or 1, T) int64.
    """

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        """Add to token embeddings. x: (B, T, dim) -> (B, T, dim)."""
        return x

    def rotate(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate queries and keys of the same new positions.

        q: (B, H, T, hd), k: (B, Hkv, T, hd) -> same shapes.
        """
        return q, k

    def bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor | None:
        """Additive attention-score bias, (B or 1, H, T, S), or None."""
        return None

    def check_length(self, length: int) -> None:
        """Raise :class:`~lightningllm.errors.ConfigError` if ``length`` positions cannot be encoded."""

    @property
    def adds_bias(self) -> bool:
        """Whether this plugin overrides :meth:`bias` (attention that never forms scores cannot honour it)."""
        return type(self).bias is not Position.bias


class PositionFactory(Protocol):
    def __call__(self, *, dim: int, n_heads: int, head_dim: int, max_seq_len: int) -> Position: ...


class Attention(nn.Module):
    """Token mixing. Sub-modules use the shared names ``q_proj k_proj v_proj o_proj``."""

    def forward(
        self,
        x: Tensor,
        *,
        position: Position,
        positions: Tensor,
        mask: AttentionMask,
        cache: KVCache | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim).

        Args:
            position: the model's positional plugin (``rotate`` and ``bias`` are called here).
            positions: (B or 1, T) absolute positions of ``x``.
            mask: which keys each query may see.
            cache: this layer's cache, updated in place while decoding.
            context: (B, S, dim) encoder output for cross-attention.
        """
        raise NotImplementedError

    def make_cache(self, batch_size: int, max_len: int, **tensor_kwargs) -> KVCache:
        """A cache for decoding ``max_len`` positions."""
        raise NotImplementedError

    def check_compatible(self, position: Position) -> None:
        """Raise :class:`~lightningllm.errors.ConfigError` with the reason if the math forbids ``position``.

        The model calls it once at build time, so an impossible pairing (for example a score bias
        with attention that never forms scores) is refused before any training starts.
        """


class AttentionFactory(Protocol):
    def __call__(self, *, dim: int, n_heads: int, n_kv_heads: int, dropout: float) -> Attention: ...


class FeedForward(nn.Module):
    """Per-token transform. Sub-modules use ``gate_proj up_proj down_proj``.

    A module that produces an auxiliary loss (mixture-of-experts load balancing) stores
    it in ``self.aux_loss`` during ``forward``; tasks add :func:`aux_loss` to their loss.
    """

    aux_loss: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim)."""
        raise NotImplementedError


class FeedForwardFactory(Protocol):
    def __call__(self, *, dim: int, hidden_dim: int, dropout: float) -> FeedForward: ...


class Norm(nn.Module):
    """Normalisation over the last dimension. x: (..., dim) -> (..., dim)."""


class NormFactory(Protocol):
    def __call__(self, *, dim: int) -> Norm: ...


class Block(nn.Module):
    """One layer: how norms, attention, feed-forward and residuals are wired.

    The unit that FSDP wraps and activation checkpointing recomputes. A layout whose
    output is already normalised (post-norm) sets ``final_norm = False`` so the model
    adds no norm after the last block. A layout that uses one norm for both branches may
    set ``norm_2`` to None so no parameter goes unused (DDP requires that).

    A layout sends each branch through :meth:`attend` and :meth:`feed_forward`, which apply
    the residual options every layout shares, in this order::

        branch output -> dropout -> * layer scale (per channel) -> drop path -> residual add

    Stochastic depth: Huang et al. (2016), "Deep Networks with Stochastic Depth" (per-sample
    "drop path" as in timm). Layer scale: Touvron et al. (2021), "Going deeper with Image
    Transformers" (CaiT), section 2.

    Cross-attention (the decoder of an encoder-decoder; Vaswani et al., 2017, section 3.1; T5,
    Raffel et al., 2020): a block built with a ``cross_attention`` child (and its ``norm_cross``)
    attends from the residual stream to ``context``, the encoder output, through
    :meth:`cross_attend`; layouts run self-attention -> cross-attention -> feed-forward. A block
    without one is exactly the decoder-only / encoder block, and ``forward`` refuses a ``context``.

    Args:
        attention, ffn, norm_1, norm_2: built children.
        dropout: residual dropout on each branch's output.
        dim: model width; the model passes it (needed only by ``layer_scale``).
        drop_path: stochastic depth: in training, each branch's output is dropped for a whole
            sample (batch row) with this probability and scaled by ``1/(1 - drop_path)`` when kept;
            each branch draws independently. In [0, 1); 0 turns it off.
        layer_scale: multiply each branch's output by its own learnable per-channel vector
            initialised to this value (CaiT uses 0.1 to 1e-6, smaller for deeper models);
            ``None`` turns it off.
        cross_attention: built attention child that reads ``context`` (None: no cross-attention).
        norm_cross: the norm of the cross-attention branch (given with ``cross_attention``).
    """

    final_norm: bool = True

    def __init__(
        self,
        attention: Attention,
        ffn: FeedForward,
        norm_1: Norm,
        norm_2: Norm,
        dropout: float = 0.0,
        *,
        dim: int | None = None,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        cross_attention: Attention | None = None,
        norm_cross: Norm | None = None,
    ):
        super().__init__()
        self._check_residual_options(type(self).__name__, dim, drop_path, layer_scale)
        self.attention = attention
        self.ffn = ffn
        self.norm_1 = norm_1
        self.norm_2 = norm_2
        self.cross_attention = cross_attention
        self.norm_cross = norm_cross
        self.dropout = nn.Dropout(dropout)
        self.drop_path, self.layer_scale = drop_path, layer_scale
        if layer_scale is None:
            self.register_parameter("attention_scale", None)
            self.register_parameter("ffn_scale", None)
        else:
            self.attention_scale = nn.Parameter(torch.full((dim,), float(layer_scale)))  # (dim,)
            self.ffn_scale = nn.Parameter(torch.full((dim,), float(layer_scale)))  # (dim,)
        if layer_scale is None or cross_attention is None:
            self.register_parameter("cross_attention_scale", None)
        else:
            self.cross_attention_scale = nn.Parameter(torch.full((dim,), float(layer_scale)))  # (dim,)

    def reset_parameters(self) -> None:
        """Refill the layer-scale vectors with their initial value (children reset themselves)."""
        if self.layer_scale is not None:
            with torch.no_grad():
                for scale in (self.attention_scale, self.ffn_scale, self.cross_attention_scale):
                    if scale is not None:
                        scale.fill_(self.layer_scale)

    def attend(self, x: Tensor, **attention_kwargs) -> Tensor:
        """The attention branch, ready to add to the residual stream. x: (B, T, dim) -> (B, T, dim)."""
        return self.residual(self.attention(x, **attention_kwargs), self.attention_scale)

    def cross_attend(
        self,
        x: Tensor,
        *,
        context: Tensor,
        context_mask: AttentionMask | None = None,
        cache: KVCache | None = None,
        position: Position,
        positions: Tensor,
    ) -> Tensor:
        """The cross-attention branch, ready to add to the residual stream. x: (B, T, dim) -> (B, T, dim).

        Args:
            context: (B, S, dim) encoder output the queries of ``x`` attend to.
            context_mask: its ``padding`` (B, S) marks the real context tokens (None: all are real).
            cache: this layer's cross-attention cache: filled with the context's keys/values on the
                first call and reused afterwards, so decoding projects the context once.
            position, positions: as in :meth:`Attention.forward` (attention plugins apply no
                positional hook to cross-attention: queries and keys belong to different sequences).
        """
        mask = context_mask if context_mask is not None else AttentionMask(causal=False)
        y = self.cross_attention(x, position=position, positions=positions, mask=mask, cache=cache, context=context)
        return self.residual(y, self.cross_attention_scale)

    def check_context(self, context: Tensor | None) -> bool:
        """Whether this block runs its cross-attention branch; refuses a context it cannot read or a missing one."""
        if self.cross_attention is None:
            if context is not None:
                raise ConfigError(
                    f"{type(self).__name__} got a context (an encoder output) but was built without a "
                    "cross_attention child, so it cannot read it. Build the block with cross_attention= and "
                    "norm_cross= (EncoderDecoder does this for its decoder), or leave context out."
                )
            return False
        if context is None:
            raise ConfigError(
                f"{type(self).__name__} was built with cross-attention, so it needs context= (the encoder "
                "output, (B, S, dim)) on every call."
            )
        return True

    def feed_forward(self, x: Tensor) -> Tensor:
        """The feed-forward branch, ready to add to the residual stream. x: (B, T, dim) -> (B, T, dim)."""
        return self.residual(self.ffn(x), self.ffn_scale)

    def residual(self, branch: Tensor, scale: Tensor | None = None) -> Tensor:
        """``drop_path(scale * dropout(branch))``. branch: (B, T, dim) -> (B, T, dim).

        Args:
            branch: a branch's output.
            scale: (dim,) per-channel scale, or None.
        """
        branch = self.dropout(branch)
        if scale is not None:
            branch = branch * scale
        if self.training and self.drop_path > 0:
            keep = 1.0 - self.drop_path
            # one draw per sample, broadcast over the other dimensions: (B, 1, 1)
            kept = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(keep)
            branch = branch * kept.div_(keep)
        return branch

    def forward(
        self,
        x: Tensor,
        *,
        position: Position,
        positions: Tensor,
        mask: AttentionMask,
        cache: KVCache | None = None,
        context: Tensor | None = None,
        context_mask: AttentionMask | None = None,
        cross_cache: KVCache | None = None,
    ) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim); keyword arguments as in :meth:`Attention.forward`.

        Args:
            context: (B, S, dim) encoder output; required by, and only accepted by, a block with
                cross-attention.
            context_mask: padding of ``context`` (see :meth:`cross_attend`).
            cross_cache: the cross-attention cache (see :meth:`cross_attend`).
        """
        raise NotImplementedError

    def extra_repr(self) -> str:
        options = {"drop_path": self.drop_path, "layer_scale": self.layer_scale}
        return ", ".join(f"{k}={v}" for k, v in options.items() if v)

    @staticmethod
    def _check_residual_options(layout: str, dim: int | None, drop_path: float, layer_scale: float | None) -> None:
        if not 0.0 <= drop_path < 1.0:
            raise ConfigError(
                f"{layout} got drop_path={drop_path}: it is the probability of dropping a residual branch for a "
                "sample in training, so it must lie in [0, 1) (0 turns stochastic depth off; 1 would drop "
                "every branch always). Typical values are 0.0 to 0.2."
            )
        if layer_scale is not None and not layer_scale > 0:
            raise ConfigError(
                f"{layout} got layer_scale={layer_scale}: it is the initial value of the learnable per-channel "
                "scale on each residual branch, so it must be a positive number (CaiT uses 0.1 to 1e-6), or "
                "null to turn layer scale off."
            )
        if layer_scale is not None and dim is None:
            raise ConfigError(
                f"{layout} got layer_scale={layer_scale} but no dim: the per-channel scale needs the model width. "
                "Models pass dim to the block factory themselves; when building a block by hand, pass dim=."
            )


class BlockFactory(Protocol):
    """Models pass ``cross_attention`` and ``norm_cross`` only when they build a cross-attending block."""

    def __call__(
        self,
        *,
        attention: Attention,
        ffn: FeedForward,
        norm_1: Norm,
        norm_2: Norm,
        dropout: float,
        dim: int,
        cross_attention: Attention | None = None,
        norm_cross: Norm | None = None,
    ) -> Block: ...


class Head(nn.Module):
    """What a model computes from its final hidden states: token logits, class logits, a score.

    A model holds exactly one head in its ``head`` slot (built from its config, so ``export`` ->
    ``load`` rebuilds it); a task that needs another one calls the model's ``replace_head``.
    Parameters: ``reset_parameters()`` initialises the head's own (the model's build-time rule
    covers its ``nn.Linear`` children, see :mod:`lightningllm.init`).

    ``outputs`` says what ``forward`` gives, so a task can tell whether the head serves it: ``"tokens"``
    (logits over the vocabulary), ``"classes"``, ``"score"`` or ``"hidden"`` (no head).
    """

    outputs: str = "tokens"

    def forward(self, hidden: Tensor, *, padding: Tensor | None = None) -> Tensor:
        """hidden: (B, T, dim) -> the head's output ((B, T, vocab_size), (B, n_classes), (B,), ...).

        Args:
            hidden: the backbone's final hidden states.
            padding: (B, T) bool, True at real tokens (None: every token is real); pooling heads read it.
        """
        raise NotImplementedError


class HeadFactory(Protocol):
    """The model passes its structure; YAML gives only the head's own knobs (``n_classes``, ``pooling``)."""

    def __call__(
        self, *, dim: int, vocab_size: int, norm: NormFactory, embedding: nn.Embedding | None, logit_scale: float
    ) -> Head: ...


class Transform:
    """A change applied to a built model after its start weights: freezing, adapters, weight quantisation.

    A transform acts on the built model by module-name patterns (PEFT's way: wrap the target module,
    keep the original as ``base_layer``) and is recorded in the model's config as ``{class_path,
    init_args}``, so ``from_config`` re-applies it and ``export`` -> ``load`` rebuilds the same module
    tree. Modules it adds initialise themselves through their own ``reset_parameters()`` (on the CPU
    path now, on the meta-device path when FSDP materialises them); nothing re-initialises the model.

    Subclasses set :attr:`config` to their init arguments (plain YAML values).
    """

    config: dict = {}

    def apply(self, model: nn.Module) -> None:
        """Change ``model`` in place."""
        raise NotImplementedError


class Adapter(Transform):
    """A transform that adds trainable modules to a frozen model: LoRA and the other parameter-efficient methods.

    ``apply(model)`` puts :class:`AdapterModule` s in place of (or beside) the modules it targets, under the
    adapter's :attr:`name`, and leaves only the adapter's parameters trainable. The model-wide operations
    act on every adapter module of a model (:mod:`lightningllm.adapters`): ``merge_adapters`` /
    ``unmerge_adapters``, the ``disabled(model)`` context (a policy with adapters off is its own reference
    model), ``set_active_adapters`` and the adapter-only state dict that ``save_adapter`` / ``load_adapter``
    write and read.
    """

    #: the adapter's name in its modules' ``ModuleDict`` s (several adapters may live on one model)
    name: str = "default"
    #: {our parameter name relative to a wrapper, ``{name}`` for the adapter's name: Hugging Face PEFT's name}
    #: for the adapters PEFT also has (``{"lora_A.{name}.weight": "lora_A.weight"}``); empty: none
    peft_keys: dict[str, str] = {}

    def peft_config(self, layers: dict[str, str]) -> dict:
        """This adapter as a Hugging Face PEFT ``adapter_config.json`` (``lightningllm.convert.peft``).

        Args:
            layers: {our module name: its Hugging Face module name} of the layers this adapter wraps.

        Raises:
            ConfigError: PEFT has no equivalent of this adapter (the default; the reason is named).
        """
        raise ConfigError(
            f"{type(self).__name__} has no Hugging Face PEFT equivalent that lightningllm writes; save it in "
            "lightningllm's own adapter format (save_adapter without format='peft')."
        )


class AdapterModule(nn.Module):
    """A module holding one or more named adapters (PEFT's layer; torchtune's ``AdapterModule`` protocol).

    Attributes:
        enabled: False turns every adapter of the module off (the module computes what the base model did).
        active: names of the adapters that take part in ``forward``.
        merged: names of the adapters folded into the base weights (they no longer add in ``forward``).
    """

    enabled: bool
    active: list[str]
    merged: list[str]

    def adapter_names(self) -> list[str]:
        """Names of the adapters this module holds, in the order they were added."""
        raise NotImplementedError

    def adapter_params(self, name: str) -> list[str]:
        """Names (relative to this module, as in its ``state_dict``) of adapter ``name``'s parameters."""
        raise NotImplementedError

    def merge(self) -> None:
        """Fold the active adapters into the base weights, where the math allows; raise with the reason where not."""
        raise NotImplementedError

    def unmerge(self) -> None:
        """Take the merged adapters back out of the base weights."""
        raise NotImplementedError

    def unload(self) -> nn.Module:
        """The plain module to put back in this one's place once its adapters are merged (or dropped)."""
        raise NotImplementedError


class Model(Protocol):
    """What tasks, generation and estimate may rely on, for Decoder, Encoder, EncoderDecoder and PerceiverEncoder.

    Attributes:
        dim: width of the hidden states.
        vocab_size: rows of the token embedding.
        n_layers: blocks (of the decoder stack, for an encoder-decoder).
        max_seq_len: the longest sequence the positional plugin encodes.
        causal: whether the output at position t depends only on inputs <= t (so it can cache).
        config: plain-data description; ``type(model).from_config(config)`` rebuilds the same model.
        head: the :class:`Head` in the model's head slot; ``forward`` returns its output.
    """

    dim: int
    vocab_size: int
    n_layers: int
    max_seq_len: int
    causal: bool
    config: dict[str, Any]
    head: Head

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Model: ...

    def hidden_states(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        mask: AttentionMask | None = None,
        positions: Tensor | None = None,
        cache: list[KVCache] | None = None,
    ) -> Tensor:
        """input_ids (B, T) or inputs_embeds (B, T, dim) -> final hidden states (B, T, dim) (Perceiver: latents)."""
        ...

    def make_cache(self, batch_size: int, max_len: int | None = None) -> list[KVCache]:
        """Empty decoding caches; a bidirectional model refuses with the reason."""
        ...

    def replace_head(self, head: HeadFactory, reason: str) -> Head:
        """Swap in a new head (see :class:`~lightningllm.lifecycle.ModelLifecycle`)."""
        ...


MODEL_ATTRIBUTES = ("dim", "vocab_size", "n_layers", "max_seq_len", "causal", "config", "head", "from_config",
                    "hidden_states", "make_cache", "replace_head")  # fmt: skip


def check_model(model: Any, user: str) -> None:
    """Refuse, before training, a module that does not meet the :class:`Model` protocol, naming what it lacks.

    Args:
        model: the module a task or tool was given.
        user: who needs it, for the message (``"CausalLM"``).
    """
    missing = [name for name in MODEL_ATTRIBUTES if not hasattr(model, name)]
    if missing:
        raise ConfigError(
            f"{user} needs a lightningllm model, but {type(model).__name__} lacks {', '.join(missing)} of the model "
            "protocol (lightningllm.contracts.Model). Use Decoder, Encoder, EncoderDecoder or PerceiverEncoder from "
            "lightningllm.models, or give the module those attributes."
        )


def aux_loss(model: nn.Module) -> Tensor | float:
    """Sum of the auxiliary losses the last forward pass left on ``model``'s sub-modules."""
    losses: Iterable[Tensor] = (m.aux_loss for m in model.modules() if getattr(m, "aux_loss", None) is not None)
    return sum(losses, 0.0)


def module_metrics(model: nn.Module) -> dict[str, Tensor]:
    """Mean over sub-modules of what each one's ``metrics()`` says about its last forward.

    A plugin that has something worth logging (a mixture-of-experts layer's per-expert load)
    defines ``metrics() -> dict[str, Tensor]``; tasks log the result under ``train/``.
    """
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for module in model.modules():
        report = getattr(module, "metrics", None)
        if module is model or not callable(report):
            continue
        for key, value in report().items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    return {key: total / counts[key] for key, total in sums.items()}


def prepare_distributed(model: nn.Module) -> list[str]:
    """Let plugins split themselves over ranks once the process group exists; hide what differs from DDP.

    A plugin that holds a different share of its parameters on each rank (mixture-of-experts expert
    parallelism) defines ``prepare_distributed() -> list[str]``: it splits itself and returns the names,
    relative to itself, of its parameters and buffers that now differ per rank. DDP is told to leave
    those unsynchronised. Tasks call this from ``configure_model``, which Lightning runs after the
    strategy has set up the process group and before DDP wraps the module and the optimizer sees the
    parameters. Without a process group the plugins keep everything; calling it twice is harmless.

    Args:
        model: the module DDP will wrap (names are relative to it).

    Returns:
        The names DDP ignores (also set on ``model`` for DDP to read).
    """
    from torch.nn.parallel import DistributedDataParallel

    ignore = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    for name, module in model.named_modules():
        hook = getattr(module, "prepare_distributed", None)
        if callable(hook):
            names = [f"{name}.{key}" if name else key for key in hook()]
            ignore += [key for key in names if key not in ignore]
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    return ignore
