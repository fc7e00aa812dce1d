"""Text of one generated row, written as its tokens come (``lightningllm generate`` prints through it)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor

from lightningllm.generation import StopStrings


class TextStream:
    """A ``stream`` callback of :func:`~lightningllm.generation.generate` for row 0: writes its text as it grows.

    Each step decodes the row's tokens so far (a token may be part of a character, and a tokenizer may spell
    a piece differently once more follows) and writes what is new, except the end a stop string could still
    claim: the last ``len(longest stop) - 1`` characters, and a trailing incomplete character (U+FFFD).
    :meth:`close` writes the rest, cut after the first stop string, and a newline; so the whole output is the
    text a non-streaming run prints.

    Args:
        decode: ids -> text.
        write: called with each new piece of text (e.g. ``sys.stdout.write`` then flush).
        stop: the stop strings, or None.
        skip: ids never shown (EOS).
    """

    def __init__(
        self, decode: Callable[[list[int]], str], write: Callable[[str], None], stop: StopStrings | None = None,
        skip: Iterable[int] = (),
    ) -> None:  # fmt: skip
        self.decode, self.write, self.stop, self.skip = decode, write, stop, set(skip)
        self.hold = max(len(s) for s in stop.strings) - 1 if stop is not None else 0
        self.ids: list[int] = []
        self.written = ""

    def __call__(self, token: Tensor, live: Tensor) -> None:
        """token: (B,) the step's tokens; live: (B,) bool, True for rows still generating. Row 0 is written."""
        if not bool(live[0]) or int(token[0]) in self.skip:
            return
        self.ids.append(int(token[0]))
        text = self.decode(self.ids)
        safe = text[: max(len(text) - self.hold, 0)].rstrip("\ufffd")
        if self.stop is not None:
            safe = safe[: len(self.stop.cut(text))]
        self._write_up_to(safe)

    def close(self) -> None:
        """Write what is left (up to the end of the first stop string) and a newline."""
        text = self.decode(self.ids)
        self._write_up_to(self.stop.cut(text) if self.stop is not None else text)
        self.write("\n")

    def _write_up_to(self, text: str) -> None:
        if len(text) > len(self.written) and text.startswith(self.written):
            self.write(text[len(self.written) :])
            self.written = text
