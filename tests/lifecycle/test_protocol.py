"""One model protocol for Decoder, Encoder, EncoderDecoder and PerceiverEncoder."""

from __future__ import annotations

import pytest
import torch

from lightningllm.contracts import MODEL_ATTRIBUTES, check_model
from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask
from lightningllm.models import Decoder, Encoder, EncoderDecoder, PerceiverEncoder
from lightningllm.registry import get

PLUGINS = dict(attention=get("attention", "MultiHeadAttention"), ffn=get("ffn", "MLP"), norm=get("norm", "LayerNorm"),
               position=get("position", "LearnedPosition"), block=get("block", "PreNorm"))  # fmt: skip
SIZES = dict(vocab_size=40, dim=16, n_layers=2, n_heads=2, max_seq_len=32)


def build(cls):
    torch.manual_seed(0)
    extra = {"n_latents": 4} if cls is PerceiverEncoder else {}
    return cls(**SIZES, **PLUGINS, **extra).eval()


MODELS = [Decoder, Encoder, EncoderDecoder, PerceiverEncoder]


@pytest.mark.parametrize("cls", MODELS)
def test_every_model_meets_the_protocol(cls):
    model = build(cls)
    check_model(model, "test")
    assert all(hasattr(model, name) for name in MODEL_ATTRIBUTES)
    assert (model.dim, model.vocab_size, model.max_seq_len) == (16, 40, 32)
    assert model.causal is (cls in (Decoder, EncoderDecoder))
    rebuilt = type(model).from_config(model.config)
    assert rebuilt.config == model.config


@pytest.mark.parametrize("cls", MODELS)
def test_hidden_states_from_ids_equal_hidden_states_from_their_embeddings(cls):
    model = build(cls)
    ids = torch.randint(5, 40, (2, 7))
    padding = torch.ones(2, 7, dtype=torch.bool)
    padding[1, 5:] = False
    mask = AttentionMask(causal=model.causal, padding=padding)
    embed = model.decoder.embed if cls is EncoderDecoder else model.embed
    from_ids = model.hidden_states(ids, mask=mask)
    from_embeds = model.hidden_states(inputs_embeds=embed(ids), mask=mask)
    torch.testing.assert_close(from_ids, from_embeds, rtol=0, atol=0)
    assert from_ids.shape[0] == 2 and from_ids.shape[-1] == model.dim
    with pytest.raises(ConfigError, match="exactly one of input_ids"):
        model.hidden_states(ids, inputs_embeds=embed(ids))


@pytest.mark.parametrize("cls", [Encoder, PerceiverEncoder])
def test_bidirectional_models_refuse_a_cache_with_the_reason(cls):
    with pytest.raises(ConfigError, match="attends bidirectionally, so it has no key/value cache"):
        build(cls).make_cache(1)


def test_the_decoder_cache_continues_hidden_states():
    model = build(Decoder)
    ids = torch.randint(5, 40, (1, 6))
    cache = model.make_cache(1)
    first = model.hidden_states(ids[:, :4], cache=cache)
    second = model.hidden_states(ids[:, 4:], cache=cache)
    torch.testing.assert_close(torch.cat([first, second], 1), model.hidden_states(ids), rtol=1e-5, atol=1e-5)


def test_ignore_index_is_defined_once():
    import lightningllm.tasks.causal_lm as causal_lm
    import lightningllm.tasks.masked_lm as masked_lm
    import lightningllm.tasks.span_corruption as span_corruption
    from lightningllm.contracts import IGNORE_INDEX

    assert IGNORE_INDEX == -100
    for module in (causal_lm, masked_lm, span_corruption):
        assert module.IGNORE_INDEX is IGNORE_INDEX
