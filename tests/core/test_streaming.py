"""TextStream: the text of row 0 written as it grows, never past a stop string, the whole equal to the final text."""

import torch

from lightningllm.generation import StopStrings
from lightningllm.registry import get
from lightningllm.streaming import TextStream

TEXT = "to be or not to be, that is the question"


def char_tokenizer():
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train([TEXT])
    return tokenizer


def feed(stream, ids, live=None):
    for i, token in enumerate(ids):
        stream(torch.tensor([token, 0]), torch.tensor([True if live is None else live[i], True]))
    stream.close()


def test_pieces_come_token_by_token_and_add_up_to_the_text():
    tokenizer, pieces = char_tokenizer(), []
    feed(TextStream(tokenizer.decode, pieces.append), tokenizer.encode("to be"))
    assert pieces == ["t", "o", " ", "b", "e", "\n"]


def test_nothing_past_a_stop_string_is_ever_written():
    tokenizer, pieces = char_tokenizer(), []
    stop = StopStrings(["not", " or"], tokenizer.decode)
    feed(TextStream(tokenizer.decode, pieces.append, stop), tokenizer.encode("to be or not to"))
    assert "".join(pieces) == "to be or\n"
    assert pieces[:3] == ["t", "o", " "]  # held back only as much as the longest stop string, less one character
    written = ""
    for piece in pieces[:-1]:
        written += piece
        assert stop.cut(TEXT).startswith(written) and len(written) <= len("to be or")


def test_skipped_ids_and_finished_rows_are_not_written():
    tokenizer, pieces = char_tokenizer(), []
    ids = tokenizer.encode("to") + [tokenizer.eos_id] + tokenizer.encode("be")
    feed(TextStream(tokenizer.decode, pieces.append, skip=[tokenizer.eos_id]), ids, live=[1, 1, 1, 0, 0])
    assert "".join(pieces) == "to\n"
