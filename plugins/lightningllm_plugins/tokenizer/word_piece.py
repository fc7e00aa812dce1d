"""WordPiece tokenizer (BERT style)."""

from __future__ import annotations

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from lightningllm.registry import register
from lightningllm.tokenizer import SPECIAL_TOKENS
from lightningllm_plugins.tokenizer._hf_tokenizers import HFTokenizersTokenizer, component_name

MAX_WORD_CHARS = 100  # a longer word encodes to <unk>, as in BERT


@register("tokenizer")
class WordPiece(HFTokenizersTokenizer):
    """WordPiece as in BERT (Schuster & Nakajima, 2012; Devlin et al., 2019).

    The BERT normaliser (control characters removed, every whitespace character made a space,
    spaces around CJK characters, optional lowercasing; accents kept) and BERT pre-tokenizer
    (split on whitespace, each punctuation character its own word), then greedy longest-match
    pieces, ``##`` marking a piece that continues a word. A word with a character the vocabulary
    lacks, or longer than 100 characters, encodes to one ``<unk>``.

    Not lossless (``lossless`` is False): :meth:`decode` joins words with one space, so whitespace
    and the gluing of punctuation are lost. What it guarantees: for a text whose words use only
    trained characters, ``decode(encode(text))`` is ``" ".join(words)``, where ``words`` are the
    pre-tokenizer's words (for ASCII: runs of letters and digits, and each other non-space character).
    Special tokens take ids 0..4. Saved as ``tokenizer.json``, readable by ``tokenizers``.

    Args:
        vocab_size: the largest vocabulary :meth:`train` builds; it must hold the 5 special tokens
            and every character of the training texts (with and without ``##``). None: 8000.
        path: a folder written by :meth:`save`, or a ``tokenizer.json`` file, to load instead of training.
        min_frequency: how often a pair must occur to be merged.
        lowercase: lowercase the text before splitting it.
    """

    lossless = False

    def __init__(
        self, vocab_size: int | None = None, path: str | None = None, min_frequency: int = 2, lowercase: bool = False
    ) -> None:
        self.lowercase = lowercase
        super().__init__(vocab_size=vocab_size, path=path, min_frequency=min_frequency)

    def init_args(self) -> dict:
        return {**super().init_args(), "lowercase": self.lowercase}

    def _pipeline(self) -> HFTokenizer:
        tok = HFTokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS[1], max_input_chars_per_word=MAX_WORD_CHARS))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=self.lowercase
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        return tok

    def _trainer(self, vocab_size: int) -> trainers.Trainer:
        return trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=self.min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            continuing_subword_prefix="##",
            show_progress=False,
        )

    def _pipeline_problem(self, tok: HFTokenizer) -> str | None:
        found = (component_name(tok.model), component_name(tok.pre_tokenizer), component_name(tok.decoder))
        if found != ("WordPiece", "BertPreTokenizer", "WordPiece"):
            return f"expected a WordPiece model with BertPreTokenizer and WordPiece decoder, found {' / '.join(found)}"
        return None
