"""ByteLevelBPE: checked against tokenizers.Tokenizer loaded from the saved tokenizer.json."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from lightningllm.errors import TokenizerError
from lightningllm.registry import get
from lightningllm.tokenizer import SPECIAL_TOKENS

NAME = "ByteLevelBPE"
VOCAB = 400  # 5 special tokens + 256 bytes + 139 merges
MODEL_FILE = "tokenizer.json"
ByteLevelBPE = get("tokenizer", NAME)


def test_it_trains_and_compresses(tok, reference, corpus):
    assert tok.lossless
    assert tok.vocab_size == VOCAB == reference.get_vocab_size()
    text = "".join(corpus)
    n_tokens = len(tok.encode(text))
    assert n_tokens < len(text) and n_tokens < 0.6 * len(text.encode())  # merges beat one token per byte


def test_special_ids_then_byte_alphabet(tok, reference):
    assert [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id] == [0, 1, 2, 3, 4]
    assert [reference.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert {reference.id_to_token(i) for i in range(5, 5 + 256)} == set(pre_tokenizers.ByteLevel.alphabet())
    assert tok.encode("<eos>") == [tok.eos_id]
    assert tok.decode(range(5)) == "".join(SPECIAL_TOKENS)


def test_encode_matches_tokenizers_library(tok, reference, corpus, lossless_samples):
    for text in corpus + lossless_samples:
        assert tok.encode(text) == reference.encode(text).ids
        assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text() | st.lists(st.sampled_from(["\n", " ", "\t", "a", "é", "😀", "▁", *SPECIAL_TOKENS])).map("".join))
def test_round_trip_on_any_text(tok, reference, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == reference.encode(text).ids


def test_save_load_round_trip(saved, corpus, check, lossless_samples):
    check.save_load_round_trip(ByteLevelBPE, *saved, MODEL_FILE, "".join(corpus + lossless_samples))


def test_bad_inputs(tok, tmp_path, corpus, check):
    check.refuses_untrained(ByteLevelBPE, tmp_path)
    with pytest.raises(TokenizerError, match="vocab_size=100 .*>= 262"):
        ByteLevelBPE(vocab_size=100)
    with pytest.raises(TokenizerError, match="no such file"):
        ByteLevelBPE(path=str(tmp_path / "missing.json"))
    (tmp_path / "tokenizer.json").write_text("[1, 2, 3]")
    with pytest.raises(TokenizerError, match="not a tokenizers JSON file"):
        ByteLevelBPE(path=str(tmp_path))
    word_piece = get("tokenizer", "WordPiece")(vocab_size=200)
    word_piece.train(corpus)
    word_piece.save(tmp_path / "wp")
    with pytest.raises(TokenizerError, match="expected a BPE model with ByteLevel"):
        ByteLevelBPE(path=str(tmp_path / "wp"))
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([VOCAB])
