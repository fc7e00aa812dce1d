"""SentencePiece BPE tokenizer."""

from __future__ import annotations

from lightningllm.registry import register
from lightningllm_plugins.tokenizer._sentencepiece import SentencePieceTokenizer


@register("tokenizer")
class SentencePieceBPE(SentencePieceTokenizer):
    """Byte-pair encoding (Sennrich et al., 2016) trained by SentencePiece (Kudo & Richardson, 2018).

    Lossless on every text and saved as ``tokenizer.model``; the arguments (``vocab_size``, ``path``,
    ``character_coverage``, ...) are those of ``SentencePieceTokenizer``, documented there.
    """

    model_type = "bpe"
