"""Checks SentencePieceBPE and SentencePieceUnigram share, parametrized over both plugins.

Each plugin's own file (test_sentencepiece_bpe.py, test_sentencepiece_unigram.py) holds its it-trains check
and its encode check against sentencepiece.SentencePieceProcessor on the saved model file.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightningllm.errors import TokenizerError
from lightningllm.registry import get
from lightningllm.tokenizer import SPECIAL_TOKENS

VOCAB = 400  # as in each plugin's own file
MODEL_FILE = "tokenizer.model"


@pytest.fixture(scope="module", params=["SentencePieceBPE", "SentencePieceUnigram"])
def cls(request):
    return get("tokenizer", request.param)


@pytest.fixture(scope="module")
def saved(cls, corpus, tmp_path_factory, train_and_save):
    return train_and_save(cls.__name__, VOCAB, corpus, tmp_path_factory.mktemp(cls.__name__))


def test_special_ids(tok, reference):
    assert [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id] == [0, 1, 2, 3, 4]
    assert [reference.pad_id(), reference.unk_id(), reference.bos_id(), reference.eos_id()] == [0, 1, 2, 3]
    assert reference.piece_to_id("<mask>") == 4
    assert tok.encode("<mask>") == [tok.mask_id]
    assert tok.decode(range(5)) == "".join(SPECIAL_TOKENS)


@settings(max_examples=100, deadline=None)
@given(st.text().filter(lambda t: "\u2581" not in t))
def test_matches_reference_on_any_text_without_space_mark(tok, reference, text):
    assert tok.encode(text) == reference.encode(text)
    assert reference.decode(reference.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text() | st.lists(st.sampled_from(["▁", "\n", " ", "a", "é", "😀", *SPECIAL_TOKENS])).map("".join))
def test_round_trip_on_any_text(tok, text):
    """Lossless on every text, newlines included; "▁" (U+2581) too, thanks to encode's byte spelling."""
    assert tok.decode(tok.encode(text)) == text


def test_space_mark_is_spelled_in_bytes(tok, reference):
    text = "a\u2581b"
    assert reference.decode(reference.encode(text)) == "a b"  # why encode spells "▁" in bytes
    byte_ids = [reference.piece_to_id(f"<0x{b:02X}>") for b in "\u2581".encode()]
    assert tok.encode(text) == reference.encode("a") + byte_ids + reference.encode("b")
    assert tok.decode(tok.encode(text)) == text


def test_save_load_round_trip(saved, cls, corpus, check, lossless_samples):
    check.save_load_round_trip(cls, *saved, MODEL_FILE, "".join(corpus + lossless_samples))


def test_bad_inputs(tok, cls, tmp_path, corpus, check):
    check.refuses_untrained(cls, tmp_path)
    with pytest.raises(TokenizerError, match="vocab_size=100 .*>= 262"):
        cls(vocab_size=100)
    with pytest.raises(TokenizerError, match=r"vocab_size=270 is too small.*at least \d+"):
        cls(vocab_size=270).train(corpus)
    with pytest.raises(TokenizerError, match="character_coverage"):
        cls(character_coverage=0.0)
    with pytest.raises(TokenizerError, match="no such file"):
        cls(path=str(tmp_path / "missing.model"))
    (tmp_path / "tokenizer.model").write_text('{"not": "a model"}')
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        cls(path=str(tmp_path))
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([-1])
