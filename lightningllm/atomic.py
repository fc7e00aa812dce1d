"""Atomic writes: build beside the target, then rename into place.

A crash or an error part-way leaves the target as it was (absent, or the previous version), so no
checkpoint, export or cache is ever half-written. The names of what a write leaves while it runs are
fixed so that the next writer or reader can tidy up after a killed one:

- ``.NAME.tmp-PID-HOST-XXXX``: a staging folder or file of process PID on the host whose name hashes to
  HOST; removed by the next write of ``NAME`` on that host once PID is no longer running (a live
  writer's staging is never touched, nor one of another host or container sharing the folder).
- ``.NAME.old``: the previous version while a folder is swapped. Replacing takes two renames (old
  version aside, new version in); a kill between them leaves ``NAME`` missing and ``.NAME.old``
  complete, so :func:`recover` puts it back; a kill after them leaves both, so it deletes ``.NAME.old``.

Replacing an existing folder is allowed only when a :class:`FolderRule` recognises it as one that
lightningllm wrote: a write never deletes a user's files.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lightningllm.errors import WriteError, write_error
from lightningllm.locks import write_lock


@dataclass(frozen=True)
class FolderRule:
    """How lightningllm recognises a folder it wrote, and may therefore replace.

    A folder is recognised when it holds every ``required`` file and nothing but plain files whose
    names ``allowed`` accepts. A missing target and an empty folder may always be written.

    Args:
        what: the folder's kind, for messages ("lightningllm export").
        required: file names that must all be present.
        allowed: the file names lightningllm writes into such a folder, given the folder (a
            tokenizer records the names of its files).
    """

    what: str
    required: frozenset[str]
    allowed: Callable[[Path], frozenset[str]]

    def check(self, target: Path) -> None:
        """Raise :class:`WriteError` unless ``target`` is missing, an empty folder or one this rule recognises."""
        if not target.exists() and not target.is_symlink():
            return
        if not target.is_dir() or target.is_symlink():
            raise WriteError(
                f"{str(target)!r} exists and is not a folder; lightningllm writes a {self.what} there only where "
                "nothing is, into an empty folder or over an earlier one, so it leaves this file alone. Remove it or "
                "choose another path."
            )
        names = {p.name for p in target.iterdir()}
        if not names:
            return
        allowed = self.allowed(target)
        foreign = sorted(
            p.name + ("/" if p.is_dir() else "") for p in target.iterdir() if p.name not in allowed or not p.is_file()
        )
        missing = sorted(self.required - names)
        if foreign or missing:
            reason = f"it holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}" if foreign else ""
            reason = reason or f"it lacks {', '.join(missing)}"
            raise WriteError(
                f"Refusing to write into {str(target)!r}: it is not empty and not a {self.what} ({reason}), and "
                f"replacing it would delete files lightningllm did not write. A {self.what} holds "
                f"{', '.join(sorted(self.required))} and only the files lightningllm writes beside them. Choose a new "
                "or empty folder, or move those files away."
            )


def staging_prefix(target: Path, pid: int | None = None) -> str:
    """The name prefix of the staging folders and files for ``target`` of process ``pid`` (None: this one)."""
    return f".{target.name}.tmp-{os.getpid() if pid is None else pid}-{_host_tag()}-"


@functools.cache
def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def retired_path(target: Path) -> Path:
    """Where the previous version of ``target`` waits while a new one is swapped in."""
    return target.parent / f".{target.name}.old"


@contextmanager
def atomic_directory(target: str | os.PathLike, *, replace: FolderRule | None = None) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; on success it becomes ``target``.

    Args:
        target: the folder to create.
        replace: replace an existing ``target`` that this rule recognises (writers of one target take
            turns under its write lock; anything else at ``target`` is refused before the block runs).
            None: an existing ``target`` wins, as another process that finished first wrote the same
            content, and the staging folder is discarded.

    Raises:
        WriteError: ``target`` holds something lightningllm did not write, or the filesystem refused a
            write (read-only, full, permission denied); the message names the path.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if replace is None:
            with _staged(target) as staging:
                yield staging
                _publish_new(staging, target)
            return
        with write_lock(target):
            recover(target, locked=True)
            replace.check(target)
            with _staged(target) as staging:
                yield staging
                _swap(staging, target)
    except OSError as err:
        raise (write_error(err, target) or err) from None


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging path beside ``target``; on success it replaces ``target``.

    Raises:
        WriteError: the filesystem refused the write; the message names the path.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(target)
        fd, name = tempfile.mkstemp(prefix=staging_prefix(target), dir=target.parent)
        os.close(fd)
        staging = Path(name)
        try:
            yield staging
            staging.chmod(0o644)
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)
    except OSError as err:
        raise (write_error(err, target) or err) from None


def recover(target: str | os.PathLike, *, locked: bool = False) -> None:
    """Finish or roll back a folder swap of ``target`` that a killed process left half-done.

    A no-op when there is nothing to recover, so readers call it before reading ``target``.

    Args:
        target: the folder.
        locked: the caller already holds ``target``'s write lock.
    """
    target = Path(target)
    retired = retired_path(target)
    if not retired.exists():
        return
    if not locked:
        with write_lock(target):
            recover(target, locked=True)
        return
    if target.exists():  # killed after the new version was in place: the old one is garbage
        shutil.rmtree(retired)
    else:  # killed between the two renames: the old version is the last complete one
        os.replace(retired, target)


def clean_stale_staging(target: Path) -> None:
    """Remove staging folders and files of ``target`` whose writing process is no longer running."""
    prefix = f".{target.name}.tmp-"
    for path in target.parent.glob(f"{glob.escape(prefix)}*"):
        pid, _, rest = path.name[len(prefix) :].partition("-")
        if pid.isdigit() and rest.startswith(f"{_host_tag()}-") and not _running(int(pid)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextmanager
def _staged(target: Path) -> Iterator[Path]:
    clean_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(target), dir=target.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish_new(staging: Path, target: Path) -> None:
    _make_readable(staging)
    if target.exists():
        return
    try:
        os.replace(staging, target)
    except OSError:
        if not target.exists():  # not a concurrent writer that finished first
            raise


def _swap(staging: Path, target: Path) -> None:
    _make_readable(staging)
    retired = retired_path(target)
    if target.exists():
        os.replace(target, retired)
    try:
        os.replace(staging, target)
    except BaseException:
        if retired.exists() and not target.exists():
            os.replace(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _make_readable(directory: Path) -> None:
    """mkdtemp and some writers create owner-only files; what we publish is meant to be shared."""
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
