"""ByteLevelBPE: checked against tokenizers.Tokenizer loaded from the saved tokenizer.json."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers

from lightningllm.errors import TokenizerError
from lightningllm.registry import get
from lightningllm.tokenizer import SPECIAL_TOKENS, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n"
    "Tokenizers turn text into ids, and subword tokenizers learn which pieces of words are common.\n"
    "The tokenizer is trained on the text, then the tokenizer encodes the text into fewer tokens.\n\n",
    "Unicode: héllo wörld — naïve café, 日本語のテキスト, emoji 😀🙃, Ελληνικά.\n\tTabs and  double  spaces.",
] * 3
VOCAB = 400  # 5 special tokens + 256 bytes + 139 merges
ByteLevelBPE = get("tokenizer", "ByteLevelBPE")
SAMPLES = ["the quick tokenizer", "  leading and trailing  ", "a\nb\n\n\tc", "<mask> and <eos>", "unseen § ∑ 🦀", ""]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tokenizer = ByteLevelBPE(vocab_size=VOCAB)
    tokenizer.train(CORPUS)
    directory = tmp_path_factory.mktemp("bbpe")
    tokenizer.save(directory)
    return tokenizer, directory


@pytest.fixture(scope="module")
def tok(saved):
    return saved[0]


@pytest.fixture(scope="module")
def reference(saved):
    return HFTokenizer.from_file(str(saved[1] / "tokenizer.json"))


def test_it_trains_and_compresses(tok, reference):
    assert tok.lossless
    assert tok.vocab_size == VOCAB == reference.get_vocab_size()
    text = "".join(CORPUS)
    n_tokens = len(tok.encode(text))
    assert n_tokens < len(text) and n_tokens < 0.6 * len(text.encode())  # merges beat one token per byte


def test_special_ids_then_byte_alphabet(tok, reference):
    assert [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id] == [0, 1, 2, 3, 4]
    assert [reference.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert {reference.id_to_token(i) for i in range(5, 5 + 256)} == set(pre_tokenizers.ByteLevel.alphabet())
    assert tok.encode("<eos>") == [tok.eos_id]
    assert tok.decode(range(5)) == "".join(SPECIAL_TOKENS)


def test_encode_matches_tokenizers_library(tok, reference):
    for text in CORPUS + SAMPLES:
        assert tok.encode(text) == reference.encode(text).ids
        assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text() | st.lists(st.sampled_from(["\n", " ", "\t", "a", "é", "😀", "▁", *SPECIAL_TOKENS])).map("".join))
def test_round_trip_on_any_text(tok, reference, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == reference.encode(text).ids


def test_save_load_round_trip(saved):
    tok, directory = saved
    text = "".join(CORPUS + SAMPLES)
    loaded = Tokenizer.load(directory)
    assert type(loaded) is ByteLevelBPE and loaded.encode(text) == tok.encode(text)
    by_file = ByteLevelBPE(path=str(directory / "tokenizer.json"))
    assert by_file.encode(text) == tok.encode(text) and by_file.vocab_size == tok.vocab_size


def test_bad_inputs(tok, tmp_path):
    with pytest.raises(TokenizerError, match="not been trained"):
        ByteLevelBPE().encode("abc")
    with pytest.raises(TokenizerError, match="not been trained"):
        ByteLevelBPE().save(tmp_path / "x")
    with pytest.raises(TokenizerError, match="vocab_size=100 .*>= 262"):
        ByteLevelBPE(vocab_size=100)
    with pytest.raises(TokenizerError, match="no such file"):
        ByteLevelBPE(path=str(tmp_path / "missing.json"))
    (tmp_path / "tokenizer.json").write_text("[1, 2, 3]")
    with pytest.raises(TokenizerError, match="not a tokenizers JSON file"):
        ByteLevelBPE(path=str(tmp_path))
    word_piece = get("tokenizer", "WordPiece")(vocab_size=200)
    word_piece.train(CORPUS)
    word_piece.save(tmp_path / "wp")
    with pytest.raises(TokenizerError, match="expected a BPE model with ByteLevel"):
        ByteLevelBPE(path=str(tmp_path / "wp"))
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([VOCAB])
