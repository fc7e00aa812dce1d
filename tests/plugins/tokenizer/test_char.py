"""CharTokenizer: checked against a hand-built character -> id dict."""

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightningllm.errors import TokenizerError
from lightningllm.registry import get
from lightningllm.tokenizer import SPECIAL_TOKENS, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n",
    "Tokenizers turn text into ids; a character tokenizer keeps one id per character.\n\tIndented line.",
    "Unicode: héllo wörld — naïve café, 日本語のテキスト, emoji 😀🙃, Ελληνικά.",
]
ALPHABET = sorted(set("".join(CORPUS)))
CharTokenizer = get("tokenizer", "CharTokenizer")


@pytest.fixture(scope="module")
def tok():
    tokenizer = CharTokenizer()
    tokenizer.train(CORPUS)
    return tokenizer


def test_vocabulary_is_specials_then_sorted_characters(tok):
    assert tok.vocab_size == len(SPECIAL_TOKENS) + len(ALPHABET)
    assert [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id] == [0, 1, 2, 3, 4]
    assert tok.decode(range(5)) == "".join(SPECIAL_TOKENS)
    assert not tok.lossless


def test_encode_matches_hand_built_mapping(tok):
    reference = {char: i + len(SPECIAL_TOKENS) for i, char in enumerate(ALPHABET)}
    for text in CORPUS:
        assert tok.encode(text) == [reference[c] for c in text]
        assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=ALPHABET))
def test_round_trip_on_training_alphabet(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_unseen_character_is_unk(tok):
    ids = tok.encode("a§b")
    assert ids[1] == tok.unk_id and len(ids) == 3
    assert tok.decode(ids) == "a<unk>b"


def test_vocab_size_caps_to_most_frequent_characters():
    counts = Counter("".join(CORPUS))
    kept = sorted(c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10])
    tokenizer = CharTokenizer(vocab_size=15)
    tokenizer.train(CORPUS)
    assert tokenizer.vocab_size == 15
    assert tokenizer.decode(range(5, 15)) == "".join(kept)
    rare = min(counts, key=lambda c: (counts[c], c))
    assert tokenizer.encode(rare) == [tokenizer.unk_id]


@pytest.mark.parametrize("texts", [["zzyyxxw"], ["xxyyzzw"], ["wxyz", "zyx"]])
def test_a_cap_on_a_frequency_tie_keeps_the_lower_code_points(texts):
    # x, y and z are equally frequent and the cap keeps only two of them: the documented tie-break keeps
    # x and y (lower code points), whatever order the characters first appear in.
    tokenizer = CharTokenizer(vocab_size=len(SPECIAL_TOKENS) + 2)
    tokenizer.train(texts)
    assert tokenizer.decode(range(5, 7)) == "xy"
    assert tokenizer.encode("z") == [tokenizer.unk_id]


def test_save_load_round_trip(tok, tmp_path, check):
    tok.save(tmp_path)
    check.save_load_round_trip(CharTokenizer, tok, tmp_path, "vocab.json", "".join(CORPUS))
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["class_path"] == "CharTokenizer"


def test_bad_inputs(tok, tmp_path, check):
    check.refuses_untrained(CharTokenizer, tmp_path)
    with pytest.raises(TokenizerError, match="vocab_size=3"):
        CharTokenizer(vocab_size=3)
    with pytest.raises(TokenizerError, match="no such file"):
        CharTokenizer(path=str(tmp_path / "missing"))
    (tmp_path / "vocab.json").write_text('{"a": 1}')
    with pytest.raises(TokenizerError, match="not a CharTokenizer vocabulary"):
        CharTokenizer(path=str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text("not json")
    with pytest.raises(TokenizerError, match="not a tokenizer config"):
        Tokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TokenizerError, match="no text"):
        CharTokenizer().train(["", ""])
