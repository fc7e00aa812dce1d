"""DataModules, corpus sources and collation."""

from lightningllm.data.classification import ClassificationDataModule
from lightningllm.data.corpus import Document, corpus_fingerprint, load_corpus, read_shakespeare_archive
from lightningllm.data.genre import ShakespeareGenreDataModule
from lightningllm.data.instruction import InstructionDataModule
from lightningllm.data.preference import PreferenceDataModule
from lightningllm.data.prefix import PrefixLMDataModule, PrefixWindows
from lightningllm.data.prompts import PromptDataModule
from lightningllm.data.text import TextDataModule, TokenWindows

__all__ = [
    "ClassificationDataModule",
    "Document",
    "InstructionDataModule",
    "PreferenceDataModule",
    "PrefixLMDataModule",
    "PrefixWindows",
    "PromptDataModule",
    "ShakespeareGenreDataModule",
    "TextDataModule",
    "TokenWindows",
    "corpus_fingerprint",
    "load_corpus",
    "read_shakespeare_archive",
]
