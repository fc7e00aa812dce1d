"""An imported Hugging Face ``tokenizer.json`` with its own vocabulary and special tokens."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from lightningllm.errors import TokenizerError
from lightningllm.registry import register
from lightningllm_plugins.tokenizer._hf_tokenizers import JSON_FILE, TokenizersBackend

ROLES = ("pad", "unk", "bos", "eos", "mask")


@register("tokenizer")
class HFTokenizer(TokenizersBackend):
    """Any ``tokenizers`` pipeline loaded from a ``tokenizer.json`` (Hugging Face fast tokenizers).

    Wraps ``tokenizers.Tokenizer.from_file`` (the tokenizers library of Moi et al., Hugging Face)
    as is: the imported vocabulary keeps its ids, so a converted checkpoint's embedding rows stay
    where they were. Unlike lightningllm's own tokenizers, the special tokens are therefore *not* at
    ids 0..4: ``special_tokens`` names, for each role (``pad``, ``unk``, ``bos``, ``eos``, ``mask``),
    the token that plays it (e.g. GPT-2's ``<|endoftext|>`` for bos and eos, BERT's ``[CLS]`` and
    ``[SEP]`` for bos and eos), and ``pad_id`` ... ``mask_id`` are that token's id. A role the imported
    tokenizer has no token for (GPT-2 has no pad or mask) raises :class:`TokenizerError` when its id
    is asked for. :meth:`encode` adds no special token (the tokenizer's post-processor, e.g. BERT's
    ``[CLS] ... [SEP]`` template, is not applied), as every lightningllm tokenizer; :meth:`decode` keeps
    special tokens as text. The vocabulary is fixed: :meth:`train` is refused.

    Args:
        vocab_size: unused (the imported vocabulary decides); kept for the common constructor.
        path: a ``tokenizer.json`` file, or a folder holding one, to load.
        special_tokens: role -> token text; roles left out have no token.
    """

    lossless = False  # depends on the imported pipeline (normalisers may lowercase or strip accents)

    def __init__(
        self,
        vocab_size: int | None = None,
        path: str | None = None,
        special_tokens: Mapping[str, str | None] | None = None,
    ) -> None:
        super().__init__(vocab_size=vocab_size, path=path)
        special_tokens = dict(special_tokens or {})
        unknown = sorted(set(special_tokens) - set(ROLES))
        if unknown:
            raise TokenizerError(
                f"HFTokenizer special_tokens has unknown role(s) {', '.join(map(repr, unknown))}; the roles are "
                f"{', '.join(ROLES)}."
            )
        self.special_tokens = {role: token for role, token in special_tokens.items() if token is not None}
        if path is not None:
            self._load_file(self._resolve_file(path, JSON_FILE))

    def role_id(self, role: str) -> int:
        """The id of the token that plays ``role`` (``pad``, ``unk``, ``bos``, ``eos`` or ``mask``)."""
        self._require_trained()
        token = self.special_tokens.get(role)
        if token is None:
            named = ", ".join(f"{r}={t!r}" for r, t in self.special_tokens.items()) or "none"
            raise TokenizerError(
                f"This imported tokenizer has no {role} token (its special tokens: {named}). Name one with "
                f"HFTokenizer(special_tokens={{'{role}': TOKEN, ...}}), or use a task setting that does not need it."
            )
        return self.token_to_id(token)

    @property
    def pad_id(self) -> int:
        return self.role_id("pad")

    @property
    def unk_id(self) -> int:
        return self.role_id("unk")

    @property
    def bos_id(self) -> int:
        return self.role_id("bos")

    @property
    def eos_id(self) -> int:
        return self.role_id("eos")

    @property
    def mask_id(self) -> int:
        return self.role_id("mask")

    def train(self, texts: Iterable[str], vocab_size: int | None = None) -> None:
        raise TokenizerError(
            "HFTokenizer wraps an imported vocabulary, which cannot be retrained (the checkpoint's embeddings "
            "are tied to its ids). Train a ByteLevelBPE, BPE or WordPiece tokenizer instead."
        )

    def init_args(self) -> dict:
        return {"vocab_size": self.target_vocab_size, "special_tokens": dict(self.special_tokens)}

    def _load_file(self, file: Path) -> None:
        tok = self._read_file(file)
        missing = {role: t for role, t in self.special_tokens.items() if tok.token_to_id(t) is None}
        if missing:
            raise TokenizerError(
                f"HFTokenizer special_tokens {missing} are not in the vocabulary of {str(file)!r}; name tokens "
                "that the tokenizer has."
            )
        self._tok = tok
