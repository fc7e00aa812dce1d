"""lightningllm: a PyTorch Lightning framework where every part of a language model is a plugin."""

from lightningllm.registry import available, get, load_plugins, register

__version__ = "0.1.0"
__all__ = ["available", "get", "load_plugins", "register", "__version__"]
