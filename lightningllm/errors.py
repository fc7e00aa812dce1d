"""The errors a user can cause.

Each one carries a single paragraph that names the bad value and what is allowed.
The CLI prints that paragraph (no traceback unless ``LIGHTNINGLLM_TRACEBACK=1``)
and exits with status 2.
"""

import errno
import os


class LightningLLMError(Exception):
    """Base class of every error a user can cause."""


class PluginNotFoundError(LightningLLMError, KeyError):
    """An unknown plugin name; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DuplicatePluginError(LightningLLMError):
    """Two plugins registered under the same (kind, name)."""


class ConfigError(LightningLLMError, ValueError):
    """A configuration the math or the code cannot honour."""


class DataError(LightningLLMError, ValueError):
    """A corpus that is missing, empty or cannot be decoded."""


class TokenizerError(LightningLLMError, ValueError):
    """A tokenizer that cannot be trained, saved, loaded or used as asked."""


class ExportError(LightningLLMError, ValueError):
    """An export folder whose config, weights and tokenizer disagree."""


class UnsafeConfigError(LightningLLMError):
    """A saved config that names code outside lightningllm and its registered plugins."""


class WriteError(LightningLLMError, OSError):
    """A write that the target refuses: a folder lightningllm did not write, a lock held by another
    process, or a filesystem fault (read-only, full, permission denied)."""


WRITE_ERRNOS = {
    errno.EROFS: "the filesystem is read-only; choose a folder on a writable filesystem",
    errno.ENOSPC: "no space is left on the device; free space or choose a folder on another filesystem",
    errno.EDQUOT: "the disk quota is exceeded; free space or choose a folder on another filesystem",
    errno.EFBIG: "the file is larger than this filesystem allows; choose a folder on another filesystem",
    errno.EACCES: "permission is denied; choose a folder this user can write",
    errno.EPERM: "the operation is not permitted; choose a folder this user can write",
}


def write_error(err: OSError, path: object | None = None) -> WriteError | None:
    """One paragraph for a filesystem fault while writing ``path`` (None: ``err`` is no such fault)."""
    if isinstance(err, LightningLLMError) or err.errno not in WRITE_ERRNOS:
        return None
    where = f"{str(path if path is not None else err.filename)!r}"
    if path is None and err.filename is None:
        where = "a file (the system did not say which)"
    inner = err.filename is not None and path is not None and str(err.filename) != str(path)
    detail = f" (at {str(err.filename)!r})" if inner else ""
    # a permission error caught without its context (path None) may come from a read as well
    verb = "access" if path is None and err.errno in (errno.EACCES, errno.EPERM) else "write"
    return WriteError(
        f"Cannot {verb} {where}{detail}: {err.strerror or os.strerror(err.errno)} "
        f"[{errno.errorcode[err.errno]}]: {WRITE_ERRNOS[err.errno]}."
    )
