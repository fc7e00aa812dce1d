"""Reading labelled texts from JSONL or CSV files, and ordering their label names.

A file holds one example per JSON line (``*.jsonl``, ``*.json``) or per CSV row (``*.csv``; ``*.tsv``
is tab-separated), with a text column and, for training and evaluation, a label column.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lightningllm.errors import DataError


@dataclass(frozen=True)
class Example:
    """One labelled (or, for prediction, unlabelled) text.

    Args:
        text: the text to classify.
        label: the label name as written in the file (numbers become their string), None when absent.
        line: 1-based line of the file it came from (the CSV header is line 1), for error messages.
    """

    text: str
    label: str | None
    line: int


def read_examples(
    path: str | os.PathLike, text_column: str = "text", label_column: str = "label", *, require_label: bool = True
) -> list[Example]:
    """Read every example of a JSONL or CSV file.

    Args:
        path: the file; ``.csv`` and ``.tsv`` are read as delimited text with a header row, anything
            else as JSON Lines (blank lines are skipped).
        text_column: the column (JSON key) holding the text.
        label_column: the column holding the label.
        require_label: refuse rows without a label (training and evaluation); prediction passes False.

    Raises:
        DataError: a missing or empty file, a line that is not a JSON object (with its line number),
            a missing column, or a text that is not a string.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"Classification data file {str(path)!r} does not exist. Give a JSONL file (one JSON object per line) or "
            f"a CSV file with a header row, with a {text_column!r} column and a {label_column!r} column."
        )
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"Classification data file {str(path)!r} is not valid UTF-8 (byte {err.start}: {err.reason}). "
            "Convert it to UTF-8 (for example `iconv -f latin1 -t utf-8`)."
        ) from None
    delimiter = {".csv": ",", ".tsv": "\t"}.get(path.suffix.lower())
    rows = _csv_rows(content, delimiter, path) if delimiter else _jsonl_rows(content, path)
    if not rows:
        raise DataError(
            f"Classification data file {str(path)!r} is empty: it holds no example. Give at least one row with a "
            f"{text_column!r} and a {label_column!r} column."
        )
    return [_example(row, line, path, text_column, label_column, require_label) for line, row in rows]


def order_labels(names: set[str] | list[str]) -> list[str]:
    """Label names in sorted order: numerically when every name is an integer ("2" before "10"), else by text.

    Sorting (rather than first-seen order) makes the class ids independent of the order of the file's rows.
    """
    names = set(names)
    if all(_is_int(n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _is_int(name: str) -> bool:
    try:
        int(name)
    except ValueError:
        return False
    return True


def _jsonl_rows(content: str, path: Path) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"Line {number} of {str(path)!r} is not valid JSON ({err.msg} at column {err.colno}): "
                f"{line[:80]!r}. Each line of a JSONL file must be one JSON object, for example "
                '{"text": "...", "label": "..."}.'
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"Line {number} of {str(path)!r} is a JSON {type(row).__name__}, not an object: {line[:80]!r}. Each "
                'line of a JSONL file must be one JSON object, for example {"text": "...", "label": "..."}.'
            )
        rows.append((number, row))
    return rows


def _csv_rows(content: str, delimiter: str, path: Path) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(content, newline=""), delimiter=delimiter)
    try:
        rows = []
        for row in reader:
            if any(v not in (None, "") for v in row.values()):
                rows.append((reader.line_num, row))
    except csv.Error as err:
        raise DataError(f"Line {reader.line_num} of {str(path)!r} is not valid CSV: {err}.") from None
    return rows


def _example(row: dict, line: int, path: Path, text_column: str, label_column: str, require_label: bool) -> Example:
    if text_column not in row:
        raise DataError(_missing_column("text_column", text_column, row, line, path))
    text = row[text_column]
    if not isinstance(text, str):
        raise DataError(
            f"Line {line} of {str(path)!r}: the {text_column!r} column holds a {type(text).__name__} "
            f"({text!r:.60}), not a string. Every text must be a string."
        )
    label = row.get(label_column)
    if label is None or label == "":
        if require_label:
            raise DataError(_missing_column("label_column", label_column, row, line, path))
        return Example(text, None, line)
    if isinstance(label, (dict, list)) or isinstance(label, float) and not label.is_integer():
        raise DataError(
            f"Line {line} of {str(path)!r}: the label {label!r} is not a class name. A label is a string or an "
            "integer naming one class."
        )
    if isinstance(label, bool):
        return Example(text, json.dumps(label), line)  # "true"/"false", as written in the file
    return Example(text, str(int(label)) if isinstance(label, float) else str(label), line)


def _missing_column(option: str, column: str, row: dict, line: int, path: Path) -> str:
    found = ", ".join(repr(k) for k in row) or "none"
    return (
        f"Line {line} of {str(path)!r} has no {column!r} column (columns found: {found}). Name the column that "
        f"holds it with the data module's {option} option, or add the column to the file."
    )
