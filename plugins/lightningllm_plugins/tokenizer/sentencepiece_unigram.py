"""SentencePiece unigram tokenizer."""

from __future__ import annotations

from lightningllm.registry import register
from lightningllm_plugins.tokenizer._sentencepiece import SentencePieceTokenizer


@register("tokenizer")
class SentencePieceUnigram(SentencePieceTokenizer):
    """Unigram language-model tokenizer (Kudo, 2018) trained by SentencePiece (Kudo & Richardson, 2018).

    Lossless on every text: identity normalisation and byte fallback keep every character, and the
    space mark ``"▁"`` itself is spelled in bytes (see ``SentencePieceTokenizer``). Saved as
    ``tokenizer.model``, readable by ``sentencepiece.SentencePieceProcessor``.

    Args:
        vocab_size: the largest vocabulary :meth:`train` builds, at least 262 (5 special tokens,
            256 byte pieces, one character); None: 8000.
        path: a folder written by :meth:`save`, or a ``.model`` file, to load instead of training.
        character_coverage: fraction of the training characters that get their own piece; the rest
            are spelled in bytes.
        split_digits: split numbers into single digits.
        max_sentence_length: training lines longer than this many bytes are skipped.
        num_threads: threads used for training.
    """

    model_type = "unigram"
