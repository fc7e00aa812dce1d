"""Constitutions: the principles a language-model judge holds responses to, and the templates that ask it.

A constitution is a YAML file with a list of ``principles`` (and an optional ``description``); a judge
template is a Jinja2 file rendered with ``principles``, ``prompt`` and ``response`` (Bai et al., 2022,
"Constitutional AI: Harmlessness from AI Feedback"). Built-ins ship inside the package, in
``lightningllm/constitutions/`` (the ``shakespeare`` constitution, the ``verdict`` and ``revise`` templates);
any other value is a path to a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jinja2
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lightningllm.errors import ConfigError

BUILTIN_DIR = "constitutions"


@dataclass(frozen=True)
class Constitution:
    """The principles a judge checks, in order.

    Args:
        name: the built-in name or the file it was read from.
        principles: one sentence each.
    """

    name: str
    principles: tuple[str, ...]

    @classmethod
    def load(cls, name: str) -> Constitution:
        """A built-in constitution (``shakespeare``) or a YAML file with a ``principles`` list of strings.

        Raises:
            ConfigError: no such constitution, invalid YAML, or no list of non-empty principles.
        """
        text = _read(name, ".yaml", "constitution")
        try:
            content = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"Constitution {name!r} is not valid YAML ({' '.join(str(err).split())}).") from None
        principles = content.get("principles") if isinstance(content, dict) else None
        if not isinstance(principles, list) or not principles or not all(isinstance(p, str) and p for p in principles):
            raise ConfigError(
                f"Constitution {name!r} holds no usable principles: it must be a YAML mapping whose 'principles' is a "
                "non-empty list of non-empty strings (see lightningllm/constitutions/shakespeare.yaml)."
            )
        return cls(name, tuple(principles))


class JudgeTemplate:
    """A Jinja2 template rendered with ``principles``, ``prompt`` and ``response`` into the text a judge reads.

    Args:
        name: a built-in template (``verdict``, ``revise``) or a path to a ``.jinja`` file.

    Raises:
        ConfigError: no such template, or it does not parse.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
        try:
            self._template = env.from_string(_read(name, ".jinja", "judge template"))
        except jinja2.TemplateSyntaxError as err:
            raise ConfigError(f"Judge template {name!r} does not parse (line {err.lineno}: {err.message}).") from None

    def render(self, constitution: Constitution, prompt: str, response: str) -> str:
        """The text the judge reads (the file's single trailing newline dropped, as Jinja2 does)."""
        try:
            return self._template.render(principles=list(constitution.principles), prompt=prompt, response=response)
        except jinja2.TemplateError as err:
            raise ConfigError(
                f"Judge template {self.name!r} failed to render: {str(err).rstrip('.')}. It may use principles, "
                "prompt and response."
            ) from None


def builtin(suffix: str) -> list[str]:
    """Names of the built-in files with ``suffix`` (``.yaml``: constitutions, ``.jinja``: templates)."""
    folder = resources.files("lightningllm") / BUILTIN_DIR
    return sorted(p.name.removesuffix(suffix) for p in folder.iterdir() if p.name.endswith(suffix))


def _read(name: str, suffix: str, what: str) -> str:
    packaged = resources.files("lightningllm") / BUILTIN_DIR / f"{name}{suffix}"
    if "/" not in name and not name.endswith(suffix) and packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"The {what} {name!r} is neither a built-in one ({', '.join(builtin(suffix))}) nor a path to a "
            f"{suffix} file."
        )
    return path.read_text(encoding="utf-8")
