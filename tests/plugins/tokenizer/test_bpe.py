"""BPE (Metaspace): checked against tokenizers.Tokenizer loaded from the saved tokenizer.json."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightningllm.errors import TokenizerError
from lightningllm.registry import get
from lightningllm.tokenizer import SPECIAL_TOKENS

NAME = "BPE"
VOCAB = 200
MODEL_FILE = "tokenizer.json"
BPE = get("tokenizer", NAME)
SAMPLES = ["the quick tokenizer", "  leading and trailing  ", "a\nb\n\n\tc", "<mask> and <eos>", ""]


def test_it_trains_and_compresses(tok, reference, corpus):
    assert not tok.lossless
    assert tok.vocab_size == VOCAB == reference.get_vocab_size()
    text = "".join(corpus)
    assert len(tok.encode(text)) < len(text) / 2


def test_special_ids(tok, reference):
    assert [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id] == [0, 1, 2, 3, 4]
    assert [reference.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.encode("<eos>") == [tok.eos_id]


def test_encode_matches_tokenizers_library(tok, reference, corpus):
    for text in corpus + SAMPLES:
        assert tok.encode(text) == reference.encode(text).ids
        assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_round_trip_on_training_alphabet(tok, reference, alphabet, data):
    """Round trip holds for text made of trained characters (the corpus has no "▁")."""
    text = data.draw(st.text(alphabet=alphabet), label="text")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == reference.encode(text).ids


def test_where_it_is_not_lossless(tok):
    unseen = tok.encode("a§b")
    assert tok.unk_id in unseen and tok.decode(unseen) == "a<unk>b"
    assert tok.decode(tok.encode("a\u2581b")) == "a b"  # the space mark decodes as a space


def test_save_load_round_trip(saved, corpus, check):
    check.save_load_round_trip(BPE, *saved, MODEL_FILE, "".join(corpus + SAMPLES))


def test_bad_inputs(tok, tmp_path, corpus, alphabet, check):
    check.refuses_untrained(BPE, tmp_path)
    too_small = len(SPECIAL_TOKENS) + len(alphabet)
    with pytest.raises(TokenizerError, match=f"vocab_size=20 is too small.*>= {too_small}"):
        BPE(vocab_size=20).train(corpus)
    with pytest.raises(TokenizerError, match="min_frequency"):
        BPE(min_frequency=-1)
    with pytest.raises(TokenizerError, match="no such file"):
        BPE(path=str(tmp_path / "missing"))
    byte_level = get("tokenizer", "ByteLevelBPE")(vocab_size=300)
    byte_level.train(corpus)
    byte_level.save(tmp_path / "bbpe")
    with pytest.raises(TokenizerError, match="expected a BPE model with Metaspace"):
        BPE(path=str(tmp_path / "bbpe" / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([VOCAB])
