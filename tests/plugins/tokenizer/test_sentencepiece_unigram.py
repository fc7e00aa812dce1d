"""SentencePieceUnigram: checked against sentencepiece.SentencePieceProcessor on the saved model file.

The checks it shares with SentencePieceBPE are parametrized over both in test_sentencepiece_common.py.
"""

from lightningllm.tokenizer import SPECIAL_TOKENS

NAME = "SentencePieceUnigram"
VOCAB = 400  # 5 special tokens + 256 byte pieces + the characters + some merges
MODEL_FILE = "tokenizer.model"


def test_it_trains_and_compresses(tok, reference, corpus):
    assert tok.lossless
    # unigram stops below vocab_size when the texts hold too few candidate pieces (documented: "the largest")
    n_chars = len(set("".join(corpus)))
    assert len(SPECIAL_TOKENS) + 256 + n_chars < tok.vocab_size <= VOCAB
    assert tok.vocab_size == reference.get_piece_size()
    text = "".join(corpus)
    assert len(tok.encode(text)) < 0.75 * len(text)  # few pieces on so small a corpus, still fewer than chars


def test_encode_matches_sentencepiece_processor(tok, reference, corpus, lossless_samples):
    for text in corpus + lossless_samples:
        assert tok.encode(text) == reference.encode(text)
        assert tok.decode(tok.encode(text)) == text
