"""BPE (Metaspace): checked against tokenizers.Tokenizer loaded from the saved tokenizer.json."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from lightningllm.errors import TokenizerError
from lightningllm.registry import get
from lightningllm.tokenizer import SPECIAL_TOKENS, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n"
    "Tokenizers turn text into ids, and subword tokenizers learn which pieces of words are common.\n"
    "The tokenizer is trained on the text, then the tokenizer encodes the text into fewer tokens.\n\n",
    "Unicode: héllo wörld — naïve café, 日本語のテキスト, emoji 😀🙃, Ελληνικά.\n\tTabs and  double  spaces.",
] * 3
ALPHABET = sorted(set("".join(CORPUS)))
VOCAB = 200
BPE = get("tokenizer", "BPE")
SAMPLES = ["the quick tokenizer", "  leading and trailing  ", "a\nb\n\n\tc", "<mask> and <eos>", ""]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tokenizer = BPE(vocab_size=VOCAB)
    tokenizer.train(CORPUS)
    directory = tmp_path_factory.mktemp("bpe")
    tokenizer.save(directory)
    return tokenizer, directory


@pytest.fixture(scope="module")
def tok(saved):
    return saved[0]


@pytest.fixture(scope="module")
def reference(saved):
    return HFTokenizer.from_file(str(saved[1] / "tokenizer.json"))


def test_it_trains_and_compresses(tok, reference):
    assert not tok.lossless
    assert tok.vocab_size == VOCAB == reference.get_vocab_size()
    text = "".join(CORPUS)
    assert len(tok.encode(text)) < len(text) / 2


def test_special_ids(tok, reference):
    assert [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id] == [0, 1, 2, 3, 4]
    assert [reference.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.encode("<eos>") == [tok.eos_id]


def test_encode_matches_tokenizers_library(tok, reference):
    for text in CORPUS + SAMPLES:
        assert tok.encode(text) == reference.encode(text).ids
        assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=ALPHABET))
def test_round_trip_on_training_alphabet(tok, reference, text):
    """Round trip holds for text made of trained characters (the corpus has no "▁")."""
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == reference.encode(text).ids


def test_where_it_is_not_lossless(tok):
    unseen = tok.encode("a§b")
    assert tok.unk_id in unseen and tok.decode(unseen) == "a<unk>b"
    assert tok.decode(tok.encode("a\u2581b")) == "a b"  # the space mark decodes as a space


def test_save_load_round_trip(saved):
    tok, directory = saved
    text = "".join(CORPUS + SAMPLES)
    loaded = Tokenizer.load(directory)
    assert type(loaded) is BPE and loaded.encode(text) == tok.encode(text)
    by_file = BPE(path=str(directory / "tokenizer.json"))
    assert by_file.encode(text) == tok.encode(text) and by_file.vocab_size == tok.vocab_size


def test_bad_inputs(tok, tmp_path):
    with pytest.raises(TokenizerError, match="not been trained"):
        BPE().encode("abc")
    with pytest.raises(TokenizerError, match="not been trained"):
        BPE().save(tmp_path / "x")
    too_small = len(SPECIAL_TOKENS) + len(ALPHABET)
    with pytest.raises(TokenizerError, match=f"vocab_size=20 is too small.*>= {too_small}"):
        BPE(vocab_size=20).train(CORPUS)
    with pytest.raises(TokenizerError, match="min_frequency"):
        BPE(min_frequency=-1)
    with pytest.raises(TokenizerError, match="no such file"):
        BPE(path=str(tmp_path / "missing"))
    byte_level = get("tokenizer", "ByteLevelBPE")(vocab_size=300)
    byte_level.train(CORPUS)
    byte_level.save(tmp_path / "bbpe")
    with pytest.raises(TokenizerError, match="expected a BPE model with Metaspace"):
        BPE(path=str(tmp_path / "bbpe" / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([VOCAB])
