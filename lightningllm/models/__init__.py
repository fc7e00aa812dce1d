"""Models assembled from plugins."""

from lightningllm.models.decoder import Decoder, LayerOverride

__all__ = ["Decoder", "LayerOverride"]
