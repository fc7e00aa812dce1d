"""One line for a command-line parse error: the key, the value and the expected type, and a pointer to ``--help``.

jsonargparse reports a bad value inside a subclass (``--model.model.dim=foo``) as a nested tree of
every union member it tried; :func:`short_message` walks down that tree to the innermost key that
failed and keeps only what the user can act on. :class:`ShortErrors` makes a parser print that line
instead of its usage dump.
"""

from __future__ import annotations

import re
import sys

from jsonargparse import ArgumentParser

_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS = re.compile(r"Problem with given class_path '([^']+)'")
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_GOT = re.compile(r"Got value: (.*?)\s*$")
_NESTED_VALUE = re.compile(r"Given value: NestedArg\(key='[^']*', val='(.*)'\)")
_GIVEN = re.compile(r"Given value: (.*?)(?:\. Got value:.*)?\s*$")
_REQUIRED = re.compile(r"the following arguments are required: (.*)")
_EXPECTED = re.compile(r"Expected an? (.+?)(?:\. Got value:.*)?\s*$")
_NO_MODULE = re.compile(r"(No module named '[^']+'|has no attribute '[^']+')")
_NOT_ACCESSIBLE = re.compile(r"Expected a path but (.+?) either not accessible or invalid")
SUBCOMMANDS = ("fit", "validate", "test", "predict")
_UNINFORMATIVE = ("NoneType", "dot import path string", "path but")


class ShortErrors(ArgumentParser):
    """A parser whose errors are one line (see :func:`short_message`) plus a pointer to ``--help``, exit 2."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or _debug():
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        required = _REQUIRED.fullmatch(message.strip())
        if required:
            dests = [name.strip() for name in required.group(1).split(",")]
            subcommand = dests[0].split(".", 1)[0]
            if "." in dests[0] and subcommand in SUBCOMMANDS and not prog.endswith(subcommand):
                prog = f"{prog} {subcommand}"
            names = [_option_name(parser, dest) for dest in dests]
            message = f"missing required option(s): {', '.join(names)}"
        sys.stderr.write(f"error: {short_message(message)} Run `{prog} --help` for the options.\n")
        self.exit(2)


def short_message(message: str) -> str:
    """The key, the value and the expected type of jsonargparse's (possibly nested) ``message``, on one line."""
    lines = [line for line in message.splitlines() if line.strip()]
    keys = [(i, _indent(line), m.group(1)) for i, line in enumerate(lines) if (m := _KEY.search(line))]
    if not keys:
        text = " ".join(line.strip() for line in lines)
        return text if text.endswith(".") else text + "."
    path, deepest = _failing_path(lines, keys)
    leaf = _leaf(lines, deepest)
    key = ".".join(path)
    value = _value(lines, (_NESTED_VALUE,)) or _value(leaf) or _value(lines)
    rejected = next(((i, m.group(1)) for i, line in enumerate(lines) if (m := _NOT_ACCEPTED.search(line))), None)
    if rejected is not None:
        at, rejected = rejected
        owner = next((m.group(1) for line in reversed(lines[:at]) if (m := _CLASS.search(line))), key)
        return f"--{key}.{rejected} is not an option: {owner} takes no argument named {rejected!r}."
    missing = next((m.group(1) for line in leaf if (m := _NO_MODULE.search(line))), None)
    if missing is not None:
        return f"--{key}={value}: cannot import {value!r} ({missing}); give a registered plugin name or a class path."
    expected = _expected(leaf)
    return f"--{key}={value} is not allowed: expected {expected}." if expected else f"--{key}={value}: {_flat(leaf)}."


def _option_name(parser: ArgumentParser, dest: str) -> str:
    """``--out`` for the dest ``out`` (``--model`` for ``fit.model``); a positional argument keeps its name."""
    tail = dest.split(".", 1)[1] if dest.split(".", 1)[0] in SUBCOMMANDS else dest
    for action in getattr(parser, "_actions", []):
        if action.dest in (dest, tail) and action.option_strings:
            return action.option_strings[-1]
    return f"--{tail}" if "." in dest else tail


def _failing_path(lines: list[str], keys: list[tuple[int, int, str]]) -> tuple[list[str], int]:
    """The keys from the outermost to the deepest ``Parser key`` line, and the deepest one's line index."""
    deepest_index, deepest_indent, _ = max(keys, key=lambda k: (k[1], k[0]))
    path = []
    limit = deepest_indent + 1
    for index, indent, key in reversed(keys):
        if index <= deepest_index and indent < limit:
            path.append(key)
            limit = indent
    return list(reversed(path)), deepest_index


def _leaf(lines: list[str], start: int) -> list[str]:
    """The line at ``start`` (its text after the key) and the deeper-indented lines under it."""
    indent = _indent(lines[start])
    leaf = [lines[start].split(":", 1)[1] if ":" in lines[start] else ""]
    for line in lines[start + 1 :]:
        if _indent(line) <= indent:
            break
        leaf.append(line)
    return leaf


def _value(lines: list[str], patterns: tuple[re.Pattern, ...] = (_GOT, _GIVEN, _NOT_ACCESSIBLE)) -> str | None:
    for pattern in patterns:
        for line in lines:
            if (m := pattern.search(line)) and not m.group(1).startswith(("Namespace(", "NestedArg(")):
                return m.group(1)
    return None


def _expected(lines: list[str]) -> str:
    found = []
    for line in lines:
        m = _EXPECTED.search(line)
        if m and not any(word in m.group(1) for word in _UNINFORMATIVE):
            found.append(_type_name(m.group(1)))
    return " or ".join(dict.fromkeys(found))


def _type_name(text: str) -> str:
    """``<class 'int'>`` -> ``int``; ``typing.Literal['a', 'b']`` -> ``one of 'a', 'b'``."""
    text = re.sub(r"<class '(?:builtins\.)?([^']+)'>", r"\1", text)
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    return f"one of {literal.group(1)}" if literal else text


def _flat(lines: list[str]) -> str:
    return " ".join(line.strip(" -") for line in lines if line.strip(" -")).rstrip(".")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _debug() -> bool:
    import os

    return os.environ.get("JSONARGPARSE_DEBUG", "").lower() in ("1", "true", "yes")
