"""The errors a user can cause.

Each one carries a single paragraph that names the bad value and what is allowed.
The CLI prints that paragraph (no traceback unless ``LIGHTNINGLLM_TRACEBACK=1``)
and exits with status 2.
"""


class LightningLLMError(Exception):
    """Base class of every error a user can cause."""


class PluginNotFoundError(LightningLLMError, KeyError):
    """An unknown plugin name; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DuplicatePluginError(LightningLLMError):
    """Two plugins registered under the same (kind, name)."""


class ConfigError(LightningLLMError, ValueError):
    """A configuration the math or the code cannot honour."""


class DataError(LightningLLMError, ValueError):
    """A corpus that is missing, empty or cannot be decoded."""


class TokenizerError(LightningLLMError, ValueError):
    """A tokenizer that cannot be trained, saved, loaded or used as asked."""


class ExportError(LightningLLMError, ValueError):
    """An export folder whose config, weights and tokenizer disagree."""
