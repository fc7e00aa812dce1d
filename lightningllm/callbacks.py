"""Lightning callbacks that tie a run to lightningllm's export format, and fp8 training."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch import nn

from lightningllm.checkpoints import run_on_rank_zero
from lightningllm.errors import ConfigError, ExportError, LightningLLMError, WriteError
from lightningllm.io import check_target, export
from lightningllm.locks import RunLock

log = logging.getLogger(__name__)


class Export(L.Callback):
    """Export the trained model and the data module's tokenizer when ``fit`` ends.

    When fitting starts, before any training, the target is checked: it must be missing, an empty folder
    or an earlier export (a folder of other files is refused, never deleted), and it is locked for the
    run, so a second run exporting to the same folder is refused naming this one's PID.

    Under FSDP every rank takes part in gathering the full weights, and rank 0 writes the one
    ``model.safetensors``, as after a single-device run; under DDP rank 0 writes its replica.
    DeepSpeed ZeRO stage 3 is refused: convert its checkpoint with Lightning's
    ``convert_zero_checkpoint_to_fp32_state_dict`` instead.

    Args:
        dirpath: the export folder (an earlier export there is replaced atomically).
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath
        self._lock: RunLock | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_on_rank_zero(trainer, self._claim_target)

    def _claim_target(self) -> None:
        check_target(self.dirpath)
        self._lock = RunLock(self.dirpath, "export folder")
        self._lock.acquire()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        model = pl_module.model
        if _is_fsdp(trainer.strategy.model):
            model = _gathered_copy(trainer.strategy.model, model, trainer.is_global_zero)
        elif getattr(trainer.strategy, "zero_stage_3", False):
            raise ExportError(
                "Export cannot gather weights sharded by DeepSpeed ZeRO stage 3. Export from a stage 1 or 2 run, or "
                "turn the checkpoint into one file with lightning.pytorch.utilities.deepspeed."
                "convert_zero_checkpoint_to_fp32_state_dict and load it into the model before exporting."
            )
        if trainer.is_global_zero:
            try:
                export(model, self.dirpath, tokenizer=tokenizer)
            except WriteError as err:
                raise WriteError(f"{err} {_where_the_weights_are(trainer)}") from None
            log.info("Exported model%s to %s", " and tokenizer" if tokenizer else "", self.dirpath)
        trainer.strategy.barrier("lightningllm_export")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _where_the_weights_are(trainer: L.Trainer) -> str:
    """Where the trained weights survive an export that failed; saves them first if no checkpoint holds them."""
    callback = trainer.checkpoint_callback
    if callback is None or callback.dirpath is None:
        return "No checkpoint callback is configured, so the trained weights exist only in this process."
    saved_step = getattr(callback, "_last_global_step_saved", None)
    newest = callback.last_model_path or callback.best_model_path
    if newest and saved_step == trainer.global_step:
        return f"The trained weights are safe in the checkpoint {newest!r} (step {saved_step})."
    if trainer.world_size > 1:
        return f"The newest checkpoint is {newest or 'none'!r} (step {saved_step}); the last steps are not saved."
    path = Path(callback.dirpath) / f"final-step={trainer.global_step}.ckpt"
    try:
        trainer.save_checkpoint(path)
    except (OSError, LightningLLMError) as err:
        return f"Saving them as a checkpoint failed too ({err}); the newest checkpoint is {newest or 'none'!r}."
    return f"The trained weights were saved to the checkpoint {str(path)!r} instead."


def _is_fsdp(module: nn.Module | None) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return module is not None and any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def _gathered_copy(wrapped: nn.Module, model: nn.Module, is_global_zero: bool) -> nn.Module | None:
    """All ranks gather ``model``'s full weights out of the FSDP-wrapped root; rank 0 gets an unsharded copy."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    prefix = next(f"{name}." for name, module in wrapped.named_modules() if module is model)
    prefix = prefix.replace("_fsdp_wrapped_module.", "")
    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config):
        state = wrapped.state_dict()
    if not is_global_zero:
        return None
    if not hasattr(type(model), "from_config"):
        raise ExportError(f"Cannot export {type(model).__name__}: it has no `from_config` to rebuild it unsharded.")
    copy = type(model).from_config(model.config)
    copy.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return copy


FLOAT8_MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9) and Hopper (9.0) onwards


class Float8Training(L.Callback):
    """Train the model's linear layers in fp8 through ``torchao.float8`` (Micikevicius et al., 2022, "FP8 Formats
    for Deep Learning").

    At setup, before any strategy wraps the model, every ``nn.Linear`` whose two sizes are multiples of 16
    becomes a ``Float8Linear`` (dynamic tensorwise scaling by default); the layers named in ``skip`` (the
    model's head by default, where fp8 costs the most accuracy) stay in the Trainer's precision.
    Use it with ``precision: bf16-mixed`` or ``bf16-true``. It needs a CUDA GPU with fp8 tensor cores
    (compute capability 8.9 or higher: H100, H200, L4, RTX 4090) and ``pip install torchao``; anywhere
    else it refuses before training starts. Combine it with ``compile: true`` for the speed-up: eager
    fp8 casts are slower than bf16.

    Args:
        recipe: torchao's recipe name: "tensorwise", "rowwise" or "rowwise_with_gw_hp".
        skip: module names (the last part of the dotted name) left in high precision.
    """

    def __init__(self, recipe: str = "tensorwise", skip: list[str] | None = None) -> None:
        self.recipe = recipe
        self.skip = set(skip if skip is not None else ["head"])

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_float8_support(trainer.strategy.root_device)
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        config = Float8LinearConfig.from_recipe_name(self.recipe)
        convert_to_float8_training(pl_module, config=config, module_filter_fn=self._converts)
        log.info("Float8Training: %d linear layers in fp8", sum(type(m).__name__ == "Float8Linear"
                                                               for m in pl_module.modules()))  # fmt: skip

    def _converts(self, module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or fqn.rsplit(".", 1)[-1] in self.skip:
            return False
        return module.in_features % 16 == 0 and module.out_features % 16 == 0


def check_float8_support(device: torch.device | str) -> None:
    """Raise :class:`ConfigError` unless ``device`` can train in fp8 and torchao is importable."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(
            f"Float8Training needs a CUDA GPU with fp8 tensor cores (compute capability 8.9+: H100, H200, L4), but "
            f"this run trains on {device.type!r}. Remove the Float8Training callback, or train on such a GPU."
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FLOAT8_MIN_CAPABILITY:
        raise ConfigError(
            f"Float8Training needs fp8 tensor cores (compute capability 8.9+: H100, H200, L4), but "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}. Remove the Float8Training "
            "callback and train in bf16-mixed."
        )
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise ConfigError(
            "Float8Training converts linear layers with torchao.float8, and torchao is not installed. "
            "Install it (pip install torchao) or remove the Float8Training callback."
        ) from None
