"""Models assembled from plugins."""

from lightningllm.models.decoder import Decoder

__all__ = ["Decoder"]
