"""Scaling switches over Lightning's strategies: FSDP that wraps each ``Block``, activation checkpointing and compile.

lightningllm has no distributed engine of its own. Lightning's strategies (DDP, FSDP, DeepSpeed) and
PyTorch's collectives do the work; this module only tells them where our unit of work is: the
:class:`~lightningllm.contracts.Block`, which FSDP shards, activation checkpointing recomputes and
``torch.compile`` compiles. Nobody maintains a list of layer classes: the units are found in the model
when the strategy sets it up.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision as LightningFSDPPrecision
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import FSDPStrategy as LightningFSDPStrategy
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointWrapper,
    apply_activation_checkpointing,
)

from lightningllm.contracts import Block
from lightningllm.errors import ConfigError


def block_units(model: nn.Module) -> list[nn.Module]:
    """Every outermost ``Block`` of ``model``, or the checkpoint wrapper around it when there is one.

    These are the modules FSDP wraps one by one: wrapping the checkpoint wrapper rather than the
    block inside it keeps a recomputed block inside a single FSDP unit.
    """
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            inner = child._checkpoint_wrapped_module if isinstance(child, CheckpointWrapper) else child
            if isinstance(inner, Block):
                units.append(child)
            else:
                visit(child)

    visit(model)
    return units


def block_wrap_policy(model: nn.Module) -> Any:
    """An FSDP ``auto_wrap_policy`` that makes each :func:`block_units` module its own FSDP unit."""
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    unit_ids = {id(unit) for unit in block_units(model)}
    return partial(lambda_auto_wrap_policy, lambda_fn=lambda module: id(module) in unit_ids)


def checkpoint_blocks(model: nn.Module) -> None:
    """Wrap every ``Block`` of ``model`` in place so its activations are recomputed in the backward pass."""
    if not any(isinstance(m, CheckpointWrapper) for m in model.modules()):
        apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, Block))


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> None:
    """``torch.compile`` every ``Block`` of ``model`` in place (``nn.Module.compile``).

    Compiling block by block (as torchtitan does) keeps parameter names, state dicts and exports
    unchanged, compiles one layer's graph once for all identical layers, and composes with FSDP,
    which wraps the compiled blocks. The embedding, the head and the loss stay eager.

    KV-cache decoding runs through the same compiled blocks. The caches are preallocated (static
    buffers), but the number of positions filled so far is a Python int on the cache module, which
    dynamo would treat as a constant and recompile for at every decoding step (falling back to eager
    after ``recompile_limit`` steps). The blocks are therefore traced with
    ``allow_unspec_int_on_nn_module``: that count becomes a symbolic size, and a whole generation
    compiles two graphs (the prompt and the one-token step) instead of one per token.

    Args:
        model: the model whose blocks are compiled.
        **compile_kwargs: ``torch.compile`` arguments (``backend``, ``mode``, ``dynamic``, ...).
    """
    for module in model.modules():
        if isinstance(module, Block) and not isinstance(module._compiled_call_impl, partial):
            module.compile(**compile_kwargs)
            module._compiled_call_impl = partial(_call_with_symbolic_module_ints, module._compiled_call_impl)


def _call_with_symbolic_module_ints(compiled: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a compiled block; integer attributes of modules it reads (cache lengths) are traced as symbols."""
    with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
        return compiled(*args, **kwargs)


def materialize_unit(unit: nn.Module, device: torch.device) -> None:
    """Give the meta tensors of one FSDP unit real storage on ``device``, each module initialised by its own rule.

    ``unit`` is the module FSDP is about to shard, without the units already wrapped inside it. Only
    meta tensors get storage; real ones (start weights loaded over a meta-built model) stay as they
    are. A module is initialised (:func:`lightningllm.init.initialize`: the rule recorded on each
    linear and embedding when the model was built, ``reset_parameters()`` for the others) when it
    holds a meta tensor itself, or when everything under it was meta (so a plugin's rule may refine
    its fresh children, as a mixture-of-experts layer does for its router). Nothing is initialised
    by its name: a module a transform added keeps its own rule (an adapter's zero ``B`` stays zero).
    Parameters shared by several modules (tied embeddings) stay shared. Does nothing when ``unit``
    holds no meta tensor. Called by FSDP as its ``param_init_fn`` on every module of a unit, parents
    first: the first call, on the unit's root, does the whole unit.

    Args:
        unit: the module FSDP wraps next.
        device: where its tensors are materialised.
    """
    from torch.distributed.fsdp._common_utils import _get_module_fsdp_state

    from lightningllm.init import initialize

    modules, queue = [], [unit]  # the unit's own modules, not those of units already wrapped inside it
    while queue:
        module = queue.pop(0)
        modules.append(module)
        queue += [child for child in module.children() if _get_module_fsdp_state(child) is None]
    own = {id(m): [*m.parameters(recurse=False), *m.buffers(recurse=False)] for m in modules}
    if not any(t.is_meta for tensors in own.values() for t in tensors):
        return
    members = {id(m) for m in modules}
    counts: dict[int, tuple[int, int]] = {}  # (meta tensors, tensors) under each module, within the unit
    for module in reversed(modules):  # children first
        below = [counts[id(c)] for c in module.children() if id(c) in members]
        counts[id(module)] = (
            sum(t.is_meta for t in own[id(module)]) + sum(meta for meta, _ in below),
            len(own[id(module)]) + sum(total for _, total in below),
        )
    with torch.no_grad():
        _to_empty_meta_only(modules, device)
    fresh = [m for m in modules if any(t.is_meta for t in own[id(m)]) or 0 < counts[id(m)][1] == counts[id(m)][0]]
    initialize(fresh)


def _to_empty_meta_only(modules: list[nn.Module], device: torch.device) -> None:
    """Real storage for each meta parameter and buffer of ``modules``; shared parameters stay shared."""
    replaced: dict[int, nn.Parameter] = {}
    for module in modules:
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                if id(param) not in replaced:
                    empty = torch.empty_like(param, device=device)
                    replaced[id(param)] = nn.Parameter(empty, requires_grad=param.requires_grad)
                setattr(module, name, replaced[id(param)])
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=device)


def prepare_blocks(model: nn.Module, *, activation_checkpointing: bool = False, compile: bool = False) -> None:
    """The tasks' ``configure_model`` switches: compile each block, then checkpoint it."""
    if compile:
        compile_blocks(model)
    if activation_checkpointing:
        checkpoint_blocks(model)


class FSDPPrecision(LightningFSDPPrecision):
    """Lightning's ``FSDPPrecision`` that also clips gradients by their norm.

    Lightning's refuses ``gradient_clip_algorithm="norm"`` because it has no reference to the root FSDP
    module, and ``torch.nn.utils.clip_grad_norm_`` over one rank's shards would use that rank's partial
    norm. :class:`FSDPStrategy` hands its root module over once it has wrapped it, and clipping calls the
    root's ``clip_grad_norm_``, which reduces the squared norms of all shards over the ranks first.
    """

    root: nn.Module | None = None

    def clip_grad_by_norm(self, optimizer: Any, clip_val: int | float) -> None:
        if self.root is None:
            raise RuntimeError("FSDPPrecision clips by norm only under lightningllm's FSDPStrategy, after setup.")
        self.root.clip_grad_norm_(clip_val)


class FSDPStrategy(LightningFSDPStrategy):
    """Lightning's ``FSDPStrategy`` with each ``Block`` of the model as its own FSDP unit.

    The auto-wrap policy comes from the model at setup time (every ``Block`` found in it, whatever its
    layout class), so configs name no layer class. Everything else is Lightning's: sharding strategy,
    CPU offload, mixed precision from the Trainer's ``precision``, and checkpoints with
    ``state_dict_type`` "full" (one file gathered on rank 0) or "sharded" (a folder of per-rank shards,
    torch.distributed.checkpoint). On CPU it runs FSDP over gloo (for tests; no speed to be had there).
    Gradient clipping by norm (``gradient_clip_val``) works, through the root module's ``clip_grad_norm_``
    (see :class:`FSDPPrecision`).

    A model built on the meta device (``with trainer.init_module(empty_init=True):`` or in a task's
    ``configure_model``) is materialised unit by unit as FSDP shards it: each module gets
    storage and its own initialisation (:func:`materialize_unit`). Parameters held as tensor subclasses
    (QLoRA's frozen NF4 weights) cannot join FSDP's flat parameters: they go to FSDP as ``ignored_states``,
    and each rank keeps them whole, at their 4-bit size.

    Args:
        activation_checkpointing: recompute each ``Block`` in the backward pass, applied after wrapping
            (``CausalLM(activation_checkpointing=True)`` does the same under any strategy; use one of the two).
        state_dict_type: "full" or "sharded" checkpoints.
        sharding_strategy: "FULL_SHARD" (ZeRO-3), "SHARD_GRAD_OP" (ZeRO-2), "NO_SHARD" (DDP) or "HYBRID_SHARD".
        cpu_offload: keep parameters and gradients on CPU between uses.
        **kwargs: any other argument of Lightning's ``FSDPStrategy`` or torch's ``FullyShardedDataParallel``;
            an explicit ``auto_wrap_policy`` replaces the block policy.
    """

    def __init__(
        self,
        activation_checkpointing: bool = False,
        state_dict_type: Literal["full", "sharded"] = "full",
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD",
        cpu_offload: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            state_dict_type=state_dict_type, sharding_strategy=sharding_strategy, cpu_offload=cpu_offload, **kwargs
        )
        self.checkpoint_blocks = activation_checkpointing
        self._block_policy = "auto_wrap_policy" not in self.kwargs

    @property
    def precision_plugin(self) -> LightningFSDPPrecision:
        return LightningFSDPStrategy.precision_plugin.fget(self)

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        if type(plugin) is LightningFSDPPrecision:  # the Trainer's choice for FSDP: the same, clipping by norm
            plugin = FSDPPrecision(plugin.precision, scaler=plugin.scaler)
        LightningFSDPStrategy.precision_plugin.fset(self, plugin)

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        if isinstance(self.precision_plugin, FSDPPrecision):
            self.precision_plugin.root = self.model  # the root FSDP module, whose clip_grad_norm_ spans all ranks

    def setup_environment(self) -> None:
        if (
            self.root_device.type == "cpu"
            and self._state_dict_type == "full"
            and self.num_processes * self.num_nodes > 1
        ):
            raise ConfigError(
                "FSDPStrategy(state_dict_type='full') cannot checkpoint on CPU: torch FSDP's full state dict offloads "
                "to CPU and crashes when the parameters already live there. On CPU use state_dict_type: sharded "
                "(the Export callback still writes one model.safetensors); on GPUs both work."
            )
        super().setup_environment()

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if self._block_policy:
            self.kwargs["auto_wrap_policy"] = block_wrap_policy(model)
        if self.checkpoint_blocks and not self._activation_checkpointing_kwargs:
            self._activation_checkpointing_kwargs = {"check_fn": lambda module: isinstance(module, Block)}
        if not {"ignored_states", "ignored_modules"} & set(self.kwargs):
            ignored = subclass_parameters(model, self.root_device)
            if ignored:
                self.kwargs["ignored_states"] = ignored
        if "param_init_fn" not in self.kwargs and _has_meta_tensors(model):
            self.kwargs["param_init_fn"] = partial(materialize_unit, device=self.root_device)
        if self.root_device.type == "cpu":
            model = self._wrap_on_cpu(model)
        return super()._setup_model(model)

    def _wrap_on_cpu(self, model: nn.Module) -> nn.Module:
        """Lightning passes ``device_id=None`` on CPU, which FSDP refuses; wrap here with the CPU device."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return model
        kwargs = dict(self.kwargs)
        wrapped = FullyShardedDataParallel(
            module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **kwargs,
        )  # fmt: skip
        self.kwargs.pop("auto_wrap_policy", None)  # already applied: keeps Lightning from warning that it is ignored
        return wrapped


def subclass_parameters(model: nn.Module, device: torch.device) -> list[nn.Parameter]:
    """The parameters of ``model`` held as tensor subclasses (QLoRA's frozen NF4 weights), moved to ``device``.

    FSDP cannot flatten them into its flat parameters, so they go to it as ``ignored_states``: each rank keeps
    them whole (replicated, at their 4-bit size) while FSDP shards the rest. FSDP moves only what it manages,
    so they are moved here.
    """
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    found = []
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if is_traceable_wrapper_subclass(param):
                if param.device != device:
                    param = nn.Parameter(param.to(device), requires_grad=param.requires_grad)
                    setattr(module, name, param)
                found.append(param)
    return found


def _has_meta_tensors(model: nn.Module) -> bool:
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])
