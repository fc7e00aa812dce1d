"""Models assembled from plugins."""

from lightningllm.models.decoder import Decoder, LayerOverride
from lightningllm.models.encoder import Encoder
from lightningllm.models.encoder_decoder import EncoderDecoder
from lightningllm.models.perceiver import PerceiverEncoder

__all__ = ["Decoder", "Encoder", "EncoderDecoder", "LayerOverride", "PerceiverEncoder"]
