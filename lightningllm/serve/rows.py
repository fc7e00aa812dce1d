"""Per-request bookkeeping while a batch of requests decodes together: each row's own limits and its text.

Requests batched together share one :func:`~lightningllm.generation.generate` call, but each has its own
``max_tokens`` and stop strings. :class:`RowWatch` is the stop criterion of that call: after every step it
reads each row's generated ids, decides which rows are finished (their end-of-sequence token, one of their
stop strings, or their token budget) and hands the new text of each row to a callback, which streams it.

As OpenAI's API does, the text a request receives ends before its stop string; text that might be the start
of a stop string (or half of a multi-byte character) is held back until the next tokens decide.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(eq=False)
class Row:
    """One request's decoding state.

    Args:
        max_tokens: the most tokens it may generate.
        stop: strings that end it; its text stops before the first one.
    """

    max_tokens: int
    stop: Sequence[str] = ()
    text: str = ""  # the text so far, cut before a stop string once one appears
    sent: int = 0  # characters of ``text`` already handed out
    tokens: int = 0  # tokens generated, the stop token included
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length" (max_tokens)

    def delta(self, final: bool = False) -> str:
        """The text not handed out yet that no later token can change (all of it when ``final``)."""
        end = len(self.text) if final or self.finish_reason else len(self.text) - self._held_back()
        new, self.sent = self.text[self.sent : end], max(self.sent, end)
        return new

    def _held_back(self) -> int:
        """How many trailing characters may still become a stop string or a whole character."""
        if self.text.endswith("\ufffd"):  # a byte-level tokenizer decoded part of a character
            return len(self.text) - self.sent
        return max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)


@dataclass
class RowWatch:
    """The stop criterion of a batched generation: per-row limits, stop strings and streamed text.

    Args:
        rows: one :class:`Row` per batch row.
        decode: ids -> text (``tokenizer.decode``).
        eos_id: the end-of-sequence id (never part of the text).
        on_step: receives, after each step, each row's new text (``None`` for rows finished earlier).
    """

    rows: list[Row]
    decode: Callable[[list[int]], str]
    eos_id: int
    on_step: Callable[[list[str | None]], None] = field(default=lambda deltas: None)

    def __call__(self, generated: Tensor) -> Tensor:
        """generated: (B, n) ids generated so far -> (B,) bool, True for finished rows."""
        deltas: list[str | None] = []
        for row, ids in zip(self.rows, generated.tolist()):
            if row.finish_reason is not None:
                deltas.append(None)
                continue
            self._advance(row, ids)
            deltas.append(row.delta())
        self.on_step(deltas)
        return torch.tensor([row.finish_reason is not None for row in self.rows], device=generated.device)

    def _advance(self, row: Row, ids: list[int]) -> None:
        """Take the row's newest token into its text and decide whether it is finished."""
        row.tokens = len(ids)
        if ids[-1] == self.eos_id:
            row.finish_reason = "stop"
            return
        row.text = self.decode(ids)
        cut = min((row.text.find(s) for s in row.stop if s in row.text), default=-1)
        if cut >= 0:
            row.text, row.finish_reason = row.text[:cut], "stop"
        elif row.tokens >= row.max_tokens:
            row.finish_reason = "length"
