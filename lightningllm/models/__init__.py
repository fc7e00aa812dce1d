"""Models assembled from plugins."""

from lightningllm.models.decoder import Decoder, LayerOverride
from lightningllm.models.encoder import Encoder

__all__ = ["Decoder", "Encoder", "LayerOverride"]
