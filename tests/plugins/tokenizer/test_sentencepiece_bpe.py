"""SentencePieceBPE: checked against sentencepiece.SentencePieceProcessor on the saved model file.

The checks it shares with SentencePieceUnigram are parametrized over both in test_sentencepiece_common.py.
"""

NAME = "SentencePieceBPE"
VOCAB = 400  # 5 special tokens + 256 byte pieces + the characters + some merges
MODEL_FILE = "tokenizer.model"


def test_it_trains_and_compresses(tok, reference, corpus):
    assert tok.lossless
    assert tok.vocab_size == VOCAB == reference.get_piece_size()
    text = "".join(corpus)
    assert len(tok.encode(text)) < len(text) / 2


def test_encode_matches_sentencepiece_processor(tok, reference, corpus, lossless_samples):
    for text in corpus + lossless_samples:
        assert tok.encode(text) == reference.encode(text)
        assert tok.decode(tok.encode(text)) == text
