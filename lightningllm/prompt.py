"""Prompt templates: one Jinja2 source renders training examples, ``generate --template`` prompts and chat turns.

A template receives ``messages`` (a list of ``{"role", "content"}`` dicts, roles ``system``, ``user`` and
``assistant``; a user turn may carry an ``input``), ``add_generation_prompt`` (a prompt for the next assistant
turn is wanted), and two special tokens: ``eot``, the end-of-turn token (the tokenizer's ``<eos>``, which
generation stops at), and ``bos``. It wraps what the model must learn to write in
``{% generation %}...{% endgeneration %}``, the tag Hugging Face chat templates use for their assistant mask.

Rendering yields :class:`Segment` s; each is tokenised on its own, so the trained tokens are exactly the
generation blocks' tokens for any tokenizer (a BPE merge never crosses a segment boundary) and a prompt
encodes to the same ids whether it is followed by a response (training) or not (generation). Built-in
templates (``alpaca``, ``chat``) ship inside the package, in ``lightningllm/prompt_templates/``
(``templates/prompt/`` in the repository points there); any other value is a path to a ``.jinja`` file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lightningllm.errors import ConfigError, DataError
from lightningllm.tokenizer import Tokenizer

# Private-use code points: no corpus text holds them, so they delimit rendered text without ambiguity.
_START, _END, _EOT, _BOS = "\ue000", "\ue001", "\ue002", "\ue003"
_SENTINELS = {_START, _END, _EOT, _BOS}
ROLES = ("system", "user", "assistant")
BUILTIN_PACKAGE = "lightningllm"
BUILTIN_DIR = "prompt_templates"


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation.

    Args:
        text: the text, or ``"<eot>"`` / ``"<bos>"`` for a special token.
        trained: inside a ``{% generation %}`` block (the loss covers its tokens).
        special: ``text`` names a special token rather than text to tokenise.
    """

    text: str
    trained: bool
    special: bool = False


class _GenerationExtension(Extension):
    """``{% generation %}...{% endgeneration %}``: marks the text the loss trains on."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller) -> str:
        return _START + caller() + _END


def builtin_templates() -> list[str]:
    """Names of the templates shipped with lightningllm (``alpaca``, ``chat``)."""
    folder = resources.files(BUILTIN_PACKAGE) / BUILTIN_DIR
    return sorted(p.name.removesuffix(".jinja") for p in folder.iterdir() if p.name.endswith(".jinja"))


class PromptTemplate:
    """A Jinja2 prompt template, checked on load to have a response slot the loss can train on.

    Args:
        name: a built-in template name (:func:`builtin_templates`) or a path to a ``.jinja`` file.

    Raises:
        ConfigError: the template is missing, does not parse, or has no response slot: an assistant reply
            must render inside ``{% generation %}`` followed by ``{{ eot }}`` inside the same block.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, extensions=[_GenerationExtension]
        )
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateSyntaxError as err:
            raise ConfigError(f"Prompt template {name!r} does not parse (line {err.lineno}: {err.message}).") from None
        self._check_response_slot()

    @cached_property
    def source(self) -> str:
        """The template's Jinja2 text."""
        builtin = resources.files(BUILTIN_PACKAGE) / BUILTIN_DIR / f"{self.name}.jinja"
        if "/" not in self.name and not self.name.endswith(".jinja") and builtin.is_file():
            return builtin.read_text(encoding="utf-8")
        path = Path(self.name).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"Prompt template {self.name!r} is neither a built-in template ({', '.join(builtin_templates())}) "
                "nor a path to a Jinja2 file."
            )
        return path.read_text(encoding="utf-8")

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[Segment]:
        """The conversation as segments, in order.

        Args:
            messages: ``[{"role": ..., "content": ...}, ...]``.
            add_generation_prompt: end with the prompt of a new assistant turn (for generation).
        """
        text = self._render_text(messages, add_generation_prompt)
        return _segments(text, self.name)

    def encode(
        self, tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Token ids of the conversation and, per token, whether the loss trains on it.

        Each segment is tokenised on its own; ``eot`` is ``tokenizer.eos_id``, ``bos`` ``tokenizer.bos_id``.
        """
        ids: list[int] = []
        trained: list[bool] = []
        for segment in self.render(messages, add_generation_prompt):
            if segment.special:
                piece = [tokenizer.eos_id if segment.text == "<eot>" else tokenizer.bos_id]
            else:
                piece = tokenizer.encode(segment.text)
            ids += piece
            trained += [segment.trained] * len(piece)
        return ids, trained

    def prompt_ids(self, tokenizer: Tokenizer, messages: Sequence[dict]) -> list[int]:
        """The ids a model continues to write the next assistant turn (``messages`` end with a user turn)."""
        return self.encode(tokenizer, messages, add_generation_prompt=True)[0]

    def _render_text(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, eot=_EOT, bos=_BOS
            )
        except jinja2.TemplateError as err:
            raise ConfigError(f"Prompt template {self.name!r} failed to render: {str(err).rstrip('.')}.") from None

    def _check_response_slot(self) -> None:
        """Render a probe conversation: each assistant reply and an end-of-turn token must be trained on."""
        replies = ["\ue010first reply\ue010", "\ue011second reply\ue011"]
        probe = [
            {"role": "system", "content": "probe system"},
            {"role": "user", "content": "probe question", "input": "probe input"},
            {"role": "assistant", "content": replies[0]},
            {"role": "user", "content": "probe follow-up"},
            {"role": "assistant", "content": replies[1]},
        ]
        segments = self.render(probe)
        trained = "".join(s.text if not s.special else "" for s in segments if s.trained)
        problem = None
        if not any(s.trained for s in segments):
            problem = "it renders nothing inside {% generation %}...{% endgeneration %}, so no token would be trained"
        elif not all(reply in trained for reply in replies):
            problem = "the assistant replies do not render inside {% generation %}...{% endgeneration %}"
        elif sum(s.trained and s.special and s.text == "<eot>" for s in segments) < len(replies):
            problem = (
                "an assistant reply is not followed by {{ eot }} inside its {% generation %} block, so the model "
                "would never learn to end its turn"
            )
        if problem:
            raise ConfigError(
                f"Prompt template {self.name!r} has no usable response slot: {problem}. Wrap each assistant "
                "message as {% generation %}{{ message.content }}{{ eot }}{% endgeneration %}, as the built-in "
                f"templates ({', '.join(builtin_templates())}) do."
            )


def _segments(text: str, name: str) -> list[Segment]:
    """Split rendered text at the sentinels into text and special-token segments."""
    segments: list[Segment] = []
    trained, buffer = False, []

    def flush() -> None:
        if buffer:
            segments.append(Segment("".join(buffer), trained))
            buffer.clear()

    for char in text:
        if char not in _SENTINELS:
            buffer.append(char)
            continue
        flush()
        if char in (_START, _END):
            if trained == (char == _START):
                raise ConfigError(f"Prompt template {name!r} nests {{% generation %}} blocks; they cannot nest.")
            trained = char == _START
        else:
            segments.append(Segment("<eot>" if char == _EOT else "<bos>", trained, special=True))
    flush()
    return segments


def check_messages(messages: object, where: str) -> list[dict]:
    """Validate one conversation: a non-empty list of ``{"role", "content"}`` with known roles and string content.

    Raises:
        DataError: naming ``where`` (for example ``train.jsonl line 3``) and what is allowed.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects.")
    for i, message in enumerate(messages):
        ok = isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)
        if not ok:
            raise DataError(
                f"{where}: message {i} is {message!r}; each message must be an object with 'role' (one of "
                f"{', '.join(ROLES)}) and 'content' (a string)."
            )
        if any(c in _SENTINELS for c in message["content"]):
            raise DataError(
                f"{where}: message {i} holds a private-use character (U+E000..U+E003) that lightningllm reserves "
                "to mark template slots; remove it from the text."
            )
    return messages
