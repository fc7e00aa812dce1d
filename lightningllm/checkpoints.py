"""Checkpoint safety: files written whole on any filesystem, damaged files named, one run per folder.

:class:`AtomicCheckpointIO` writes each checkpoint to a staging file beside its target and renames it
into place (Lightning's default stages in the temporary directory and, on another filesystem, copies
over the target in place, so a kill during the copy leaves a 0-byte ``last.ckpt``). Loading names a
missing, truncated or non-checkpoint file in one paragraph and refuses weights holding NaN or Inf.

:class:`CheckpointGuard` holds a lock on each checkpoint folder for the whole run (a second run into
it is refused, naming the first one's PID) and refuses to start a new run in a folder that already
holds another run's checkpoints (Lightning would write ``last-v1.ckpt`` beside the old ``last.ckpt``)
unless the run resumes from a checkpoint or ``overwrite`` is set.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightningllm.atomic import atomic_file
from lightningllm.errors import ConfigError, LightningLLMError
from lightningllm.io import check_finite
from lightningllm.locks import RunLock

NAMED_CHECKPOINTS = ("best", "last", "hpc", "registry")  # values of ckpt_path that Lightning resolves itself


class CheckpointError(LightningLLMError, ValueError):
    """A checkpoint file that is missing, damaged or of another format."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a staging file beside the target, ``fsync``, then rename over it.

    A failure or a kill part-way leaves the previous checkpoint of that name intact. Use it in YAML as
    ``trainer.plugins: [{class_path: lightningllm.checkpoints.AtomicCheckpointIO}]`` (the CLI's default).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or _is_remote(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path) as staging, staging.open("wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())

    def load_checkpoint(
        self, path: Any, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if _is_remote(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        check_checkpoint_file(path)
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as err:  # noqa: BLE001 - torch.load raises many types for a damaged file
            raise damaged(path, err) from None
        check_finite(checkpoint.get("state_dict", {}), str(path))
        return checkpoint


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is an existing file that could be a Lightning checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"ckpt_path={str(path)!r} does not exist. Pass a .ckpt file that ModelCheckpoint wrote (by default "
            "under the run's checkpoints folder), or 'last' for the newest checkpoint of this run's configuration."
        )
    if path.is_dir():
        raise CheckpointError(
            f"ckpt_path={str(path)!r} is a folder; pass one of the .ckpt files in it. An export folder holds final "
            "weights, not a training state, and cannot be resumed."
        )
    if _is_safetensors(path):
        raise CheckpointError(
            f"ckpt_path={str(path)!r} is a safetensors weights file (what an export holds), not a Lightning "
            "checkpoint: it has no optimizer or trainer state to resume. Pass a .ckpt file that ModelCheckpoint "
            "wrote; to use the weights, load the export folder with lightningllm.io.load."
        )
    if path.stat().st_size == 0:
        raise damaged(path, ValueError("the file is empty"))


def damaged(path: str | os.PathLike, err: BaseException) -> CheckpointError:
    """The one paragraph for a checkpoint file that torch cannot read."""
    return CheckpointError(
        f"ckpt_path={str(path)!r} is not a readable Lightning checkpoint ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else 'no detail'}); it was probably truncated by a kill or a full "
        "disk while being written by an older version. Pass an earlier checkpoint."
    )


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as handle:
        head = handle.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size


def _is_remote(path: Any) -> bool:
    return "://" in str(path)


class CheckpointGuard(L.Callback):
    """Lock each ModelCheckpoint folder for the run; refuse to mix a new run into another run's checkpoints.

    Args:
        overwrite: start a new run in a folder that holds checkpoints: files of the same name are replaced
            (Lightning's ``last-v1.ckpt`` numbering is switched off); others are left alone.
    """

    def __init__(self, overwrite: bool = False) -> None:
        if not isinstance(overwrite, bool):
            raise ConfigError(f"overwrite={overwrite!r} must be true or false.")
        self.overwrite = overwrite
        self._locks: list[RunLock] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_on_rank_zero(trainer, lambda: self._check(trainer))

    def _check(self, trainer: L.Trainer) -> None:
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or callback.dirpath is None or _is_remote(callback.dirpath):
                continue
            folder = Path(callback.dirpath)
            lock = RunLock(folder, "checkpoint folder")
            lock.acquire()
            self._locks.append(lock)
            old = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
            if old and trainer.ckpt_path is None and not self.overwrite:
                raise CheckpointError(
                    f"The checkpoint folder {str(folder)!r} already holds another run's checkpoints "
                    f"({', '.join(old[:4])}{' ...' if len(old) > 4 else ''}); a new run there would write "
                    "last-v1.ckpt beside them and leave last.ckpt the oldest. Resume that run with "
                    f"--ckpt_path {str(folder / old[0])!r}, start over in it with --overwrite true (replaces "
                    "checkpoints of the same name), or give this run another folder."
                )
            if self.overwrite:
                callback._enable_version_counter = False  # replace last.ckpt rather than add last-v1.ckpt

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks.clear()


def run_on_rank_zero(trainer: L.Trainer, check: Callable[[], None]) -> None:
    """Run ``check`` on rank zero; its :class:`LightningLLMError` is raised on every rank, so none waits forever."""
    error = None
    if trainer.is_global_zero:
        try:
            check()
        except LightningLLMError as err:
            error = err
    message = trainer.strategy.broadcast(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise CheckpointError(message)
