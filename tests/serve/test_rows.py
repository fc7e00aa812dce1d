"""RowWatch: requests decoded in one batch each keep their own budget and stop strings, and stream their text."""

from __future__ import annotations

import pytest
import torch

from lightningllm.generation import generate
from lightningllm.serve.rows import Row, RowWatch

PROMPTS = ["To be", "whether 'tis", "q", "the mind to"]
MAX_TOKENS = [12, 30, 7, 25]
STOPS = [(), (",", "\n"), ("zz",), ("m, ", "l")]


def alone(model, tokenizer, prompt: str, max_tokens: int, stop: tuple[str, ...]) -> tuple[str, str]:
    """(text, finish reason) of one request decoded on its own, cut as OpenAI cuts: before the first stop string."""
    ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
    out = generate(model, torch.tensor([ids]), max_tokens, temperature=0, eos_id=tokenizer.eos_id,
                   vocab_limit=tokenizer.vocab_size)[0, len(ids):].tolist()  # fmt: skip
    ended = tokenizer.eos_id in out
    text = tokenizer.decode(out[: out.index(tokenizer.eos_id)] if ended else out)
    cuts = [text.find(s) for s in stop if s in text]
    if cuts:
        return text[: min(cuts)], "stop"
    return text, "stop" if ended else "length"


def test_a_batch_answers_each_request_as_alone(offline):
    model, tokenizer = offline
    rows = [Row(n, stop) for n, stop in zip(MAX_TOKENS, STOPS)]
    streamed = [""] * len(rows)

    def collect(deltas):
        for i, delta in enumerate(deltas):
            streamed[i] += delta or ""

    watch = RowWatch(rows, tokenizer.decode, tokenizer.eos_id, collect)
    prompts = [torch.tensor([tokenizer.bos_id, *tokenizer.encode(p)]) for p in PROMPTS]
    generate(model, prompts, max(MAX_TOKENS), temperature=0, eos_id=tokenizer.eos_id, stop=watch,
             vocab_limit=tokenizer.vocab_size)  # fmt: skip
    expected = [alone(model, tokenizer, *args) for args in zip(PROMPTS, MAX_TOKENS, STOPS)]
    assert [(row.text, row.finish_reason) for row in rows] == expected
    assert streamed == [text for text, _ in expected]
    assert {reason for _, reason in expected} == {"stop", "length"}  # both paths are exercised


def feed(watch: RowWatch, ids: list[int]) -> list[str | None]:
    """Step the watch through ``ids`` as generate would (the prefix grows by one each step); the deltas."""
    seen = []
    watch.on_step = seen.append
    for n in range(1, len(ids) + 1):
        watch(torch.tensor([ids[:n]]))
    return [step[0] for step in seen]


def chars(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


def test_text_that_may_start_a_stop_string_waits_for_the_next_token():
    row = Row(max_tokens=20, stop=("abc",))
    deltas = feed(RowWatch([row], chars, eos_id=0), [ord(c) for c in "xabyab"])
    assert deltas == ["x", "", "", "aby", "", ""]  # "a", "ab" wait; "aby" is no stop; the final "ab" still waits
    assert row.finish_reason is None and row.delta(final=True) == "ab"


def test_a_stop_string_ends_the_row_and_is_not_part_of_its_text():
    row = Row(max_tokens=20, stop=("abc",))
    deltas = feed(RowWatch([row], chars, eos_id=0), [ord(c) for c in "xyabcz"][:5])
    assert "".join(deltas) == "xy" and row.text == "xy" and row.finish_reason == "stop" and row.tokens == 5


@pytest.mark.parametrize("ids, reason, text", [([120, 121, 0], "stop", "xy"), ([120, 121, 122], "length", "xyz")])
def test_eos_or_the_budget_finishes_a_row(ids, reason, text):
    row = Row(max_tokens=3)
    deltas = feed(RowWatch([row], chars, eos_id=0), ids)
    assert (row.finish_reason, "".join(deltas), row.tokens) == (reason, text, 3)


def test_half_a_character_waits_for_its_other_bytes():
    """A byte-level tokenizer decodes an unfinished character as U+FFFD: nothing is sent until it completes."""
    pieces = {1: b"a", 2: b"\xc3", 3: b"\xa9"}  # "é" is C3 A9 in UTF-8
    decode = lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")  # noqa: E731
    row = Row(max_tokens=10)
    assert feed(RowWatch([row], decode, eos_id=0), [1, 2, 3]) == ["a", "", "é"]


def test_finished_rows_report_nothing_more():
    rows = [Row(max_tokens=1), Row(max_tokens=3)]
    seen = []
    watch = RowWatch(rows, chars, eos_id=0, on_step=seen.append)
    done = [watch(torch.tensor([[120] * n, [121] * n])).tolist() for n in (1, 2, 3)]
    assert done == [[True, False], [True, False], [True, True]]
    assert seen == [["x", "y"], [None, "y"], [None, "y"]]
