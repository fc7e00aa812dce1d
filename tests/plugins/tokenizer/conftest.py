"""Shared pieces of the tokenizer plugin tests.

A test module names its plugin in ``NAME`` and the vocabulary size to train in ``VOCAB``; the ``saved``
fixture trains that tokenizer on ``corpus`` (a module may override that fixture) and saves it to a folder,
once per module; ``reference`` loads the saved ``MODEL_FILE`` with the library that defines that format,
the independent reference the plugin is checked against.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer

from lightningllm.errors import TokenizerError
from lightningllm.registry import get
from lightningllm.tokenizer import Tokenizer

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n"
    "Tokenizers turn text into ids, and subword tokenizers learn which pieces of words are common.\n"
    "The tokenizer is trained on the text, then the tokenizer encodes the text into fewer tokens.\n\n"
)
UNICODE = "Unicode: héllo wörld — naïve café, 日本語のテキスト, emoji 😀🙃, Ελληνικά.\n\tTabs and  double  spaces."
READERS = {  # saved model file -> the library that reads it
    "tokenizer.json": HFTokenizer.from_file,
    "tokenizer.model": lambda path: spm.SentencePieceProcessor(model_file=path),
}


@pytest.fixture(scope="session")
def english() -> str:
    """An English paragraph whose words repeat, so subword merges pay off."""
    return ENGLISH


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """The training texts: the English paragraph and a line of accents, CJK, emoji, Greek, tabs and runs of spaces."""
    return [ENGLISH, UNICODE] * 3


@pytest.fixture(scope="session")
def lossless_samples() -> list[str]:
    """Texts a lossless tokenizer gives back: whitespace runs, newlines, special tokens, unseen characters, ""."""
    return ["the quick tokenizer", "  leading and trailing  ", "a\nb\n\n\tc", "<mask> and <eos>", "unseen § ∑ 🦀", ""]


@pytest.fixture(scope="module")
def alphabet(corpus) -> list[str]:
    """The characters of the training texts."""
    return sorted(set("".join(corpus)))


def _train_and_save(name: str, vocab_size: int | None, corpus: list[str], directory: Path) -> tuple[Tokenizer, Path]:
    tokenizer = get("tokenizer", name)(vocab_size=vocab_size)
    tokenizer.train(corpus)
    tokenizer.save(directory)
    return tokenizer, directory


@pytest.fixture(scope="session")
def train_and_save():
    """``(name, vocab_size, corpus, folder) -> (tokenizer, folder)``: the registered tokenizer, trained and saved."""
    return _train_and_save


@pytest.fixture(scope="module")
def saved(request, corpus, tmp_path_factory) -> tuple[Tokenizer, Path]:
    """(tokenizer, folder): the module's ``NAME`` trained with vocab_size=``VOCAB`` on ``corpus``, then saved."""
    name = request.module.NAME
    return _train_and_save(name, request.module.VOCAB, corpus, tmp_path_factory.mktemp(name))


@pytest.fixture(scope="module")
def tok(saved) -> Tokenizer:
    return saved[0]


@pytest.fixture(scope="module")
def reference(request, saved):
    """The module's saved ``MODEL_FILE`` read by HF tokenizers (tokenizer.json) or sentencepiece (tokenizer.model)."""
    model_file = request.module.MODEL_FILE
    return READERS[model_file](str(saved[1] / model_file))


def save_load_round_trip(cls: type[Tokenizer], tok: Tokenizer, directory: Path, model_file: str, text: str) -> None:
    """``Tokenizer.load(directory)`` and ``cls(path=directory / model_file)`` both give ``tok`` back."""
    loaded = Tokenizer.load(directory)
    assert type(loaded) is cls and loaded.encode(text) == tok.encode(text)
    by_file = cls(path=str(directory / model_file))
    assert by_file.encode(text) == tok.encode(text) and by_file.vocab_size == tok.vocab_size


def refuses_untrained(cls: type[Tokenizer], tmp_path: Path) -> None:
    """An untrained ``cls()`` can neither encode nor save."""
    with pytest.raises(TokenizerError, match="not been trained"):
        cls().encode("abc")
    with pytest.raises(TokenizerError, match="not been trained"):
        cls().save(tmp_path / "x")


@pytest.fixture(scope="session")
def check() -> SimpleNamespace:
    """Checks every tokenizer plugin makes: ``save_load_round_trip`` and ``refuses_untrained``."""
    return SimpleNamespace(save_load_round_trip=save_load_round_trip, refuses_untrained=refuses_untrained)
