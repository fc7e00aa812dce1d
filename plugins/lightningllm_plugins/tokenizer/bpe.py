"""BPE tokenizer over whitespace-marked words (Metaspace)."""

from __future__ import annotations

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lightningllm.registry import register
from lightningllm.tokenizer import SPECIAL_TOKENS
from lightningllm_plugins.tokenizer._hf_tokenizers import HFTokenizersTokenizer, component_name


@register("tokenizer")
class BPE(HFTokenizersTokenizer):
    """Byte-pair encoding (Sennrich et al., 2016) over characters, with ``<unk>`` for unseen ones.

    Spaces become ``"▁"`` and start a new word (Metaspace, no prefix added), so spaces, tabs and
    newlines all survive. ``decode(encode(text)) == text`` holds when every character of ``text``
    was in the training texts and ``text`` has no ``"▁"`` (U+2581, which decodes as a space); an
    unseen character decodes as ``"<unk>"``. Hence ``lossless`` is False; use ``ByteLevelBPE`` for
    a tokenizer that round-trips every text. Special tokens take ids 0..4, the alphabet follows.
    Saved as ``tokenizer.json``, readable by ``tokenizers.Tokenizer.from_file``.

    Args:
        vocab_size: the largest vocabulary :meth:`train` builds; it must hold the 5 special tokens
            and every character of the training texts. None: 8000.
        path: a folder written by :meth:`save`, or a ``tokenizer.json`` file, to load instead of training.
        min_frequency: how often a pair must occur to be merged.
    """

    lossless = False

    def _pipeline(self) -> HFTokenizer:
        tok = HFTokenizer(models.BPE(unk_token=SPECIAL_TOKENS[1]))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        tok.decoder = decoders.Metaspace(prepend_scheme="never")
        return tok

    def _trainer(self, vocab_size: int) -> trainers.Trainer:
        return trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=self.min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
        )

    def _pipeline_problem(self, tok: HFTokenizer) -> str | None:
        found = (component_name(tok.model), component_name(tok.pre_tokenizer), component_name(tok.decoder))
        if found != ("BPE", "Metaspace", "Metaspace"):
            return f"expected a BPE model with Metaspace pre-tokenizer and decoder, found {' / '.join(found)}"
        return None
