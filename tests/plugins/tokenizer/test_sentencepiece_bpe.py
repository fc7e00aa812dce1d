"""SentencePieceBPE: checked against sentencepiece.SentencePieceProcessor on the saved model file."""

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from lightningllm.errors import TokenizerError
from lightningllm.registry import get
from lightningllm.tokenizer import SPECIAL_TOKENS, Tokenizer

NAME = "SentencePieceBPE"
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n"
    "Tokenizers turn text into ids, and subword tokenizers learn which pieces of words are common.\n"
    "The tokenizer is trained on the text, then the tokenizer encodes the text into fewer tokens.\n\n",
    "Unicode: héllo wörld — naïve café, 日本語のテキスト, emoji 😀🙃, Ελληνικά.\n\tTabs and  double  spaces.",
] * 3
VOCAB = 400  # 5 special tokens + 256 byte pieces + the characters + some merges
cls = get("tokenizer", NAME)
SAMPLES = ["the quick tokenizer", "  leading and trailing  ", "a\nb\n\n\tc", "<mask> and <eos>", "unseen § ∑ 🦀", ""]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tokenizer = cls(vocab_size=VOCAB)
    tokenizer.train(CORPUS)
    directory = tmp_path_factory.mktemp("spm")
    tokenizer.save(directory)
    return tokenizer, directory


@pytest.fixture(scope="module")
def tok(saved):
    return saved[0]


@pytest.fixture(scope="module")
def reference(saved):
    return spm.SentencePieceProcessor(model_file=str(saved[1] / "tokenizer.model"))


def test_it_trains_and_compresses(tok, reference):
    assert tok.lossless
    assert tok.vocab_size == VOCAB == reference.get_piece_size()
    text = "".join(CORPUS)
    assert len(tok.encode(text)) < len(text) / 2


def test_special_ids(tok, reference):
    assert [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id] == [0, 1, 2, 3, 4]
    assert [reference.pad_id(), reference.unk_id(), reference.bos_id(), reference.eos_id()] == [0, 1, 2, 3]
    assert reference.piece_to_id("<mask>") == 4
    assert tok.encode("<mask>") == [tok.mask_id]
    assert tok.decode(range(5)) == "".join(SPECIAL_TOKENS)


def test_encode_matches_sentencepiece_processor(tok, reference):
    for text in CORPUS + SAMPLES:
        assert tok.encode(text) == reference.encode(text)
        assert tok.decode(tok.encode(text)) == text


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


def test_save_load_round_trip(saved):
    tok, directory = saved
    text = "".join(CORPUS + SAMPLES)
    loaded = Tokenizer.load(directory)
    assert type(loaded) is cls and loaded.encode(text) == tok.encode(text)
    by_file = cls(path=str(directory / "tokenizer.model"))
    assert by_file.encode(text) == tok.encode(text) and by_file.vocab_size == tok.vocab_size


def test_bad_inputs(tok, tmp_path):
    with pytest.raises(TokenizerError, match="not been trained"):
        cls().encode("abc")
    with pytest.raises(TokenizerError, match="not been trained"):
        cls().save(tmp_path / "x")
    with pytest.raises(TokenizerError, match="vocab_size=100 .*>= 262"):
        cls(vocab_size=100)
    with pytest.raises(TokenizerError, match=r"vocab_size=270 is too small.*at least \d+"):
        cls(vocab_size=270).train(CORPUS)
    with pytest.raises(TokenizerError, match="character_coverage"):
        cls(character_coverage=0.0)
    with pytest.raises(TokenizerError, match="no such file"):
        cls(path=str(tmp_path / "missing.model"))
    (tmp_path / "tokenizer.model").write_text('{"not": "a model"}')
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        cls(path=str(tmp_path))
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([-1])
