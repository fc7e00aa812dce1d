"""Atomic writes: build beside the target, then rename into place.

A crash or an error part-way leaves the target as it was (absent, or the previous
version) and no staging file behind, so no checkpoint, export or cache is ever half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(target: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; on success it becomes ``target``.

    Args:
        target: the folder to create.
        replace: swap out an existing ``target`` (the old one is deleted only once the new one is in
            place). Without it an existing ``target`` wins: another process that finished first
            wrote the same content, and the staging folder is discarded.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        _make_readable(staging)
        if not target.exists():
            try:
                os.replace(staging, target)
            except OSError:
                if not target.exists():  # not a concurrent writer that finished first
                    raise
        elif replace:
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging path beside ``target``; on success it replaces ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    staging = Path(name)
    try:
        yield staging
        staging.chmod(0o644)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def _make_readable(directory: Path) -> None:
    """mkdtemp and some writers create owner-only files; what we publish is meant to be shared."""
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
