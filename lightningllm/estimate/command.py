"""``lightningllm estimate --config CONFIG.yaml [...]``: the estimates of a run before starting it.

The same YAML (and ``--key=value`` overrides) as ``lightningllm fit``. The model is built on the meta
device, so a 70B configuration is estimated in seconds on a laptop; the datamodule is built (which
trains or loads its tokenizer when the config leaves ``vocab_size`` to the data); the Trainer is not.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightningllm.errors import ConfigError
from lightningllm.estimate import RunShape, estimate
from lightningllm.estimate.extrapolate import MAX_BUILT_LAYERS, extrapolate
from lightningllm.estimate.memory import OPTIMIZER_STATES, Sharding, normalise_precision
from lightningllm.estimate.report import GIB, format_estimate, warning

DEVICE_MEMORY_FLAG = "--device_memory_gib"


def estimate_command(args: Sequence[str]) -> None:
    """Print the estimate of the run ``args`` configures; a warning on stderr when it will not fit."""
    if any(arg in ("-h", "--help") for arg in args):
        sys.stdout.write(help_text())
        return
    args, device_memory = _pop_device_memory(list(args))
    task, datamodule, trainer, deep = _build(args)
    model = task.model
    shape = RunShape(
        batch_size=_data_attribute(datamodule, "batch_size"),
        seq_len=_data_attribute(datamodule, "seq_len"),
        precision=normalise_precision(trainer.get("precision")),
        optimizer_states=_optimizer_states(task),
        sharding=_sharding(trainer.get("strategy"), _world(trainer)),
        data_parallel=_world(trainer),
        accumulate=trainer.get("accumulate_grad_batches") or 1,
        steps=trainer["max_steps"] if (trainer.get("max_steps") or -1) > 0 else None,
        checkpointing=bool(getattr(task, "activation_checkpointing", False)),
        device_memory=device_memory if device_memory is not None else _device_memory(trainer),
    )
    result, real_count = estimate(model, shape), sum(p.numel() for p in model.parameters())
    if deep:  # built at 1 layer per deep stack: extend the line through the 2-layer builds
        steps = [(count, _two_layer(model, key)) for key, count in deep.items()]
        result = extrapolate(result, [(count, estimate(variant, shape)) for count, variant in steps])
        real_count = extrapolate(real_count, [(count, sum(p.numel() for p in v.parameters())) for count, v in steps])
    sys.stdout.write(format_estimate(result, real_parameter_count=real_count))
    message = warning(result)
    if message:
        sys.stderr.write(message + "\n")


def help_text() -> str:
    """``lightningllm estimate --help``: what it does and its own options; ``fit --help`` lists the rest."""
    return f"""usage: lightningllm estimate --config CONFIG.yaml [--key=value ...] [{DEVICE_MEMORY_FLAG} GIB]

{SUMMARY}

Reads the same config as `lightningllm fit`, builds the model on the meta device (no weights are
allocated; stacks deeper than {MAX_BUILT_LAYERS} layers are extrapolated from 1- and 2-layer builds) and
prints parameters, FLOPs per token, tokens, the KV cache and the training memory per device.

options:
  -h, --help            Show this help and exit.
  -c, --config CONFIG   A YAML config, as for `lightningllm fit` (repeat to combine several).
  --key=value           Any option of `lightningllm fit` (e.g. --model.model.n_layers=24); see
                        `lightningllm fit --help` for all of them.
  {DEVICE_MEMORY_FLAG} GIB
                        Memory of one device in GiB, a number > 0 (default: the first GPU's, or the
                        machine's RAM divided among the ranks on CPU); a warning says when the run will
                        not fit.
"""


SUMMARY = "Print what a configured run will cost (parameters, FLOPs, tokens, memory) without running it."


def _build(args: list[str]) -> tuple[Any, Any, dict[str, Any], dict[str, int]]:
    """(task with its model on meta, datamodule, trainer settings, deep layer counts) from fit-style arguments.

    A layer count above :data:`MAX_BUILT_LAYERS` is built as 1; the returned dict maps its key in the
    network's config to the configured count.
    """
    from lightningllm.cli import CSV_LOGGER, LightningLLMCLI, PluginAwareParser, import_short_names

    deep: dict[str, int] = {}

    class ConfigOnlyCLI(LightningLLMCLI):
        needs_optional_dependencies = False

        def instantiate_trainer(self, **kwargs):
            return None

        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            deep.update(_shallow_layer_counts(self.config))

    import_short_names()
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = ConfigOnlyCLI(
            subclass_mode_model=True, subclass_mode_data=True, parser_class=PluginAwareParser,
            trainer_defaults={"logger": CSV_LOGGER}, run=False, args=args,
            parser_kwargs={"prog": "lightningllm estimate", "description": SUMMARY},
        )  # fmt: skip
    return cli.model, cli.datamodule, _as_dict(cli.config["trainer"]), deep


def _shallow_layer_counts(config: Any) -> dict[str, int]:
    """Set every layer count (``n_layers``, ``n_encoder_layers``, ...) of the network above the limit to 1."""
    network = config.get("model", {}).get("init_args", {}).get("model", {}).get("init_args")
    deep = {}
    for key in list(network.keys()) if network is not None and hasattr(network, "keys") else []:
        value = network.get(key)
        if key.startswith("n_") and key.endswith("layers") and isinstance(value, int) and value > MAX_BUILT_LAYERS:
            if network.get("overrides"):
                raise ConfigError(
                    f"estimate cannot extrapolate {key}={value:,} with per-layer overrides (it estimates stacks "
                    f"deeper than {MAX_BUILT_LAYERS} layers from 1- and 2-layer builds, which assumes alike layers)."
                )
            deep[key], network[key] = value, 1
    return deep


def _two_layer(model: nn.Module, key: str) -> nn.Module:
    """``model`` rebuilt on meta with 2 layers in the stack ``key`` names."""
    if not hasattr(model, "from_config") or key not in getattr(model, "config", {}):
        raise ConfigError(
            f"estimate builds {type(model).__name__} with {key}=1 and 2 to extrapolate a deep stack, but the model "
            f"has no from_config/config with {key}. Lower {key} to at most {MAX_BUILT_LAYERS}."
        )
    with torch.device("meta"):
        return type(model).from_config({**model.config, key: 2})


def _as_dict(namespace: Any) -> dict[str, Any]:
    return namespace.as_dict() if hasattr(namespace, "as_dict") else dict(namespace)


def _pop_device_memory(args: list[str]) -> tuple[list[str], int | None]:
    for i, arg in enumerate(args):
        if arg == DEVICE_MEMORY_FLAG or arg.startswith(DEVICE_MEMORY_FLAG + "="):
            value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            rest = args[:i] + args[i + (1 if "=" in arg else 2) :]
            try:
                gib = float(value)
            except ValueError:
                gib = math.nan
            if not gib > 0 or math.isinf(gib):
                raise ConfigError(
                    f"{DEVICE_MEMORY_FLAG}={value!r} is not allowed: give the memory of one device in GiB, a number "
                    "> 0 (e.g. 80)."
                )
            return rest, int(gib * GIB)
    return args, None


def _data_attribute(datamodule: Any, name: str) -> int:
    value = getattr(datamodule, name, None)
    if not isinstance(value, int):
        raise ConfigError(
            f"estimate reads the micro-batch shape from the datamodule's {name!r} attribute, which "
            f"{type(datamodule).__name__} does not have. Use a datamodule with batch_size and seq_len "
            "(lightningllm.data.TextDataModule has both)."
        )
    return value


def _optimizer_states(task: nn.Module) -> int:
    optimizer = getattr(task, "optimizer", None)
    if optimizer is None:
        return 2
    probe = optimizer([nn.Parameter(torch.zeros(1))])
    return OPTIMIZER_STATES.get(type(probe).__name__, 2)


def _world(trainer: dict[str, Any]) -> int:
    devices = trainer.get("devices", "auto")
    if isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif str(devices).lstrip("-").isdigit():
        per_node = int(devices) if int(devices) > 0 else max(torch.cuda.device_count(), 1)
    else:  # "auto"
        gpu = trainer.get("accelerator") in ("gpu", "cuda", "auto", None) and torch.cuda.is_available()
        per_node = torch.cuda.device_count() if gpu else 1
    return per_node * (trainer.get("num_nodes") or 1)


def _sharding(strategy: Any, world: int) -> Sharding:
    """How the configured strategy divides the training state among ``world`` ranks (ZeRO stages, FSDP)."""
    if isinstance(strategy, dict) and "class_path" in strategy:
        cls = _import(strategy["class_path"])
        init_args = strategy.get("init_args") or {}
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        if issubclass(cls, FSDPStrategy):
            return _fsdp(str(init_args.get("sharding_strategy", "FULL_SHARD")), world)
        if issubclass(cls, DeepSpeedStrategy):
            return _zero(int(init_args.get("stage", 2)), world)
        if issubclass(cls, ModelParallelStrategy):
            return Sharding(world, world, world)
        return Sharding()
    name = str(strategy or "auto")
    if name.startswith("fsdp"):
        return _fsdp("FULL_SHARD", world)
    if name.startswith("deepspeed"):
        stage = next((int(c) for c in name.split("_") if c in ("1", "2", "3")), 2)
        return _zero(stage, world)
    return Sharding()


def _fsdp(sharding_strategy: str, world: int) -> Sharding:
    kind = sharding_strategy.rsplit(".", 1)[-1].upper()
    if kind == "SHARD_GRAD_OP":
        return Sharding(1, world, world)
    if kind == "NO_SHARD":
        return Sharding()
    return Sharding(world, world, world)  # FULL_SHARD; HYBRID_SHARD shards within a node (approximated)


def _zero(stage: int, world: int) -> Sharding:
    return {1: Sharding(1, 1, world), 2: Sharding(1, world, world), 3: Sharding(world, world, world)}[stage]


def _device_memory(trainer: dict[str, Any]) -> int | None:
    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    if accelerator in ("cpu", "auto"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(_world(trainer), 1)
    return None


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)
