"""SentencePiece unigram tokenizer."""

from __future__ import annotations

from lightningllm.registry import register
from lightningllm_plugins.tokenizer._sentencepiece import SentencePieceTokenizer


@register("tokenizer")
class SentencePieceUnigram(SentencePieceTokenizer):
    """Unigram language-model tokenizer (Kudo, 2018) trained by SentencePiece (Kudo & Richardson, 2018).

    Lossless on every text and saved as ``tokenizer.model``; the arguments (``vocab_size``, ``path``,
    ``character_coverage``, ...) are those of ``SentencePieceTokenizer``, documented there.
    """

    model_type = "unigram"
