"""Advisory locks beside a target, so that writers of one folder take turns and two runs never share one.

Each lock is an ``flock`` on a small hidden file next to the target (``.NAME.lock`` for a write,
``.NAME.run.lock`` for a run's lifetime) holding the owner's PID. The kernel drops the lock when its
owner dies, so a killed process never leaves a folder locked. The owner deletes the lock file while it
still holds the lock, and a locker that finds its file deleted under it starts again, so no lock file is
left behind and two processes never hold locks on two different files of one name.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightningllm.errors import WriteError, write_error


def lock_path(target: str | os.PathLike, purpose: str = "") -> Path:
    """The lock file of ``target``: ``.NAME.lock`` or ``.NAME.PURPOSE.lock`` in the same folder."""
    target = Path(target)
    return target.parent / f".{target.name}{'.' + purpose if purpose else ''}.lock"


@contextmanager
def write_lock(target: str | os.PathLike) -> Iterator[None]:
    """Hold the write lock of ``target`` for the block, waiting for any other writer to finish first."""
    path = lock_path(target)
    handle = _acquire(path, target, blocking=True)
    try:
        yield
    finally:
        _release(path, handle)


class RunLock:
    """A lock held for a whole run on the folder it writes (checkpoints, export).

    Args:
        target: the folder the run writes.
        what: how the message names the folder, e.g. "export folder".
    """

    def __init__(self, target: str | os.PathLike, what: str) -> None:
        self.target = Path(target)
        self.what = what
        self._handle = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`WriteError` naming the process that holds it."""
        if self._handle is not None:
            return
        try:
            self._handle = _acquire(lock_path(self.target, "run"), self.target, blocking=False)
        except BlockingIOError as err:
            holder = str(err)
            raise WriteError(
                f"Another run (process {holder}) is writing the {self.what} {str(self.target)!r}; two runs writing "
                f"one folder would overwrite each other's files. Wait for process {holder} to finish, stop it, or "
                f"give this run another folder."
            ) from None

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._handle is not None:
            _release(lock_path(self.target, "run"), self._handle)
            self._handle = None


def _acquire(path: Path, target: str | os.PathLike, *, blocking: bool):
    """An open handle on ``path`` holding its flock; raises BlockingIOError(holder PID) when not ``blocking``."""
    while True:
        handle = _open(path, target)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise BlockingIOError(holder) from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        opened = os.fstat(handle.fileno())
        if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            _record_pid(handle)
            return handle
        handle.close()  # the previous owner deleted this file as it released it: lock the new one


def _release(path: Path, handle) -> None:
    try:
        path.unlink(missing_ok=True)  # while still holding the lock, see the module docstring
    finally:
        handle.close()  # closing the last descriptor releases the flock


def _open(path: Path, target: str | os.PathLike):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("a+")
    except OSError as err:
        raise (write_error(err, target) or err) from None


def _record_pid(handle) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
