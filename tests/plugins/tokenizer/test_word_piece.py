"""WordPiece: checked against tokenizers.Tokenizer loaded from the saved tokenizer.json."""

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightningllm.errors import TokenizerError
from lightningllm.registry import get
from lightningllm.tokenizer import SPECIAL_TOKENS, Tokenizer

ALNUM = string.ascii_letters + string.digits
NAME = "WordPiece"
VOCAB = 400  # about 160 characters with and without ##, then merges
MODEL_FILE = "tokenizer.json"
WordPiece = get("tokenizer", NAME)
SAMPLES = ["the quick tokenizer", "Hello, world!", "self.path = path", "<mask> and <eos>", ""]


def bert_words(text: str) -> list[str]:
    """BERT's pre-tokenization of ASCII text: runs of letters/digits, and each other non-space character."""
    return re.findall(r"[A-Za-z0-9]+|[^A-Za-z0-9\s]", text)


@pytest.fixture(scope="module")
def corpus(english):
    """The shared English paragraph, Unicode without CJK, and every letter, digit and punctuation mark."""
    return [
        english,
        "Unicode: héllo wörld — naïve café, emoji 😀🙃, Ελληνικά.\n\tTabs and  double  spaces.",
        # every letter and digit word-initial and word-internal (so both "x" and "##x" are learnt), every punctuation
        " ".join(c + c for c in ALNUM) + " " + " ".join(string.punctuation),
    ] * 3


def test_it_trains_and_compresses(tok, reference, english):
    assert not tok.lossless
    # the WordPiece trainer may stop a few merges short of vocab_size (documented: "the largest")
    assert len(SPECIAL_TOKENS) + 2 * len(ALNUM) < tok.vocab_size <= VOCAB
    assert tok.vocab_size == reference.get_vocab_size()
    text = english
    n_chars = len("".join(text.split()))  # what the alphabet alone would need: one token per non-space character
    assert len(tok.encode(text)) < n_chars / 2


def test_special_ids(tok, reference):
    assert [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id] == [0, 1, 2, 3, 4]
    assert [reference.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.encode("<mask>") == [tok.mask_id]


def test_encode_matches_tokenizers_library(tok, reference, corpus):
    for text in corpus + SAMPLES:
        assert tok.encode(text) == reference.encode(text).ids


words = st.text(alphabet=ALNUM, min_size=1, max_size=20) | st.sampled_from(string.punctuation)
texts = st.lists(st.tuples(words, st.sampled_from([" ", "", "  ", "\n", "\t", " \r\n"]))).map(
    lambda pairs: "".join(w + sep for w, sep in pairs)
)


@settings(max_examples=100, deadline=None)
@given(texts)
def test_decode_gives_words_joined_by_one_space(tok, reference, text):
    """Not lossless: decode(encode(t)) == " ".join(BERT words of t) for ASCII text of trained characters."""
    ids = tok.encode(text)
    assert tok.decode(ids) == " ".join(bert_words(text))
    assert tok.unk_id not in ids
    assert ids == reference.encode(text).ids


def test_what_is_lost(tok):
    assert tok.decode(tok.encode("Hello,  world!\n")) == "Hello , world !"
    assert tok.decode(tok.encode("the § sign")) == "the <unk> sign"  # a word with an unseen character


def test_lowercase_knob(tmp_path, corpus):
    tokenizer = WordPiece(vocab_size=VOCAB, lowercase=True)
    tokenizer.train(corpus)
    assert tokenizer.decode(tokenizer.encode("The QUICK Fox")) == "the quick fox"
    tokenizer.save(tmp_path)
    assert Tokenizer.load(tmp_path).init_args()["lowercase"] is True


def test_save_load_round_trip(saved, corpus, check):
    check.save_load_round_trip(WordPiece, *saved, MODEL_FILE, "".join(corpus + SAMPLES))


def test_bad_inputs(tok, tmp_path, corpus, check):
    check.refuses_untrained(WordPiece, tmp_path)
    with pytest.raises(TokenizerError, match=r"vocab_size=30 is too small.*>= \d+"):
        WordPiece(vocab_size=30).train(corpus)
    with pytest.raises(TokenizerError, match="vocab_size=2"):
        WordPiece(vocab_size=2)
    with pytest.raises(TokenizerError, match="no such file"):
        WordPiece(path=str(tmp_path / "missing"))
    bpe = get("tokenizer", "BPE")(vocab_size=200)
    bpe.train(corpus)
    bpe.save(tmp_path / "bpe")
    with pytest.raises(TokenizerError, match="expected a WordPiece model"):
        WordPiece(path=str(tmp_path / "bpe"))
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([VOCAB])
