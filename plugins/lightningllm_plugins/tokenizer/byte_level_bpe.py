"""Byte-level BPE tokenizer (GPT-2 style)."""

from __future__ import annotations

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lightningllm.registry import register
from lightningllm.tokenizer import SPECIAL_TOKENS
from lightningllm_plugins.tokenizer._hf_tokenizers import HFTokenizersTokenizer, component_name

N_BYTES = 256


@register("tokenizer")
class ByteLevelBPE(HFTokenizersTokenizer):
    """Byte-level BPE as in GPT-2 (Radford et al., 2019), on the BPE of Sennrich et al. (2016).

    Text is split with GPT-2's regex and each byte is mapped to one of 256 printable symbols
    before merging, so every text is representable and ``decode(encode(text)) == text`` for any
    Unicode text (``lossless``). The special tokens take ids 0..4 and the 256 byte symbols follow.
    Saved as ``tokenizer.json``, readable by ``tokenizers.Tokenizer.from_file``.

    Args:
        vocab_size: the largest vocabulary :meth:`train` builds, at least 262 (5 special tokens,
            256 bytes, one merge); None: 8000.
        path: a folder written by :meth:`save`, or a ``tokenizer.json`` file, to load instead of training.
        min_frequency: how often a pair must occur to be merged.
    """

    lossless = True
    min_vocab_size = len(SPECIAL_TOKENS) + N_BYTES + 1

    def _pipeline(self) -> HFTokenizer:
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        return tok

    def _trainer(self, vocab_size: int) -> trainers.Trainer:
        return trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=self.min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )

    def _pipeline_problem(self, tok: HFTokenizer) -> str | None:
        found = (component_name(tok.model), component_name(tok.pre_tokenizer), component_name(tok.decoder))
        if found != ("BPE", "ByteLevel", "ByteLevel"):
            return f"expected a BPE model with ByteLevel pre-tokenizer and decoder, found {' / '.join(found)}"
        return None
