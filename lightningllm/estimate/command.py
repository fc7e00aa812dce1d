"""``lightningllm estimate --config CONFIG.yaml [...]``: the estimates of a run before starting it.

The same YAML (and ``--key=value`` overrides) as ``lightningllm fit``. The model is built on the meta
device, so a 70B configuration is estimated in seconds on a laptop; the datamodule is built (which
trains or loads its tokenizer when the config leaves ``vocab_size`` to the data); the Trainer is not.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightningllm.errors import ConfigError
from lightningllm.estimate import RunShape, estimate
from lightningllm.estimate.memory import OPTIMIZER_STATES, Sharding, normalise_precision
from lightningllm.estimate.report import GIB, format_estimate, warning

DEVICE_MEMORY_FLAG = "--device_memory_gib"


def estimate_command(args: Sequence[str]) -> None:
    """Print the estimate of the run ``args`` configures; a warning on stderr when it will not fit."""
    args, device_memory = _pop_device_memory(list(args))
    task, datamodule, trainer = _build(args)
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
    result = estimate(model, shape)
    sys.stdout.write(format_estimate(result, real_parameter_count=sum(p.numel() for p in model.parameters())))
    message = warning(result)
    if message:
        sys.stderr.write(message + "\n")


def _build(args: list[str]) -> tuple[Any, Any, dict[str, Any]]:
    """(task with its model on meta, datamodule, trainer settings) from fit-style arguments."""
    from lightningllm.cli import CSV_LOGGER, LightningLLMCLI, PluginAwareParser, import_short_names

    class ConfigOnlyCLI(LightningLLMCLI):
        def instantiate_trainer(self, **kwargs):
            return None

    import_short_names()
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = ConfigOnlyCLI(
            subclass_mode_model=True, subclass_mode_data=True, parser_class=PluginAwareParser,
            trainer_defaults={"logger": CSV_LOGGER}, run=False, args=args,
        )  # fmt: skip
    return cli.model, cli.datamodule, _as_dict(cli.config["trainer"])


def _as_dict(namespace: Any) -> dict[str, Any]:
    return namespace.as_dict() if hasattr(namespace, "as_dict") else dict(namespace)


def _pop_device_memory(args: list[str]) -> tuple[list[str], int | None]:
    for i, arg in enumerate(args):
        if arg == DEVICE_MEMORY_FLAG or arg.startswith(DEVICE_MEMORY_FLAG + "="):
            value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            rest = args[:i] + args[i + (1 if "=" in arg else 2) :]
            try:
                return rest, int(float(value) * GIB)
            except ValueError:
                raise ConfigError(f"{DEVICE_MEMORY_FLAG}={value!r} is not a number of GiB (e.g. 80).") from None
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
