"""Decoder assembly: init, tying, configs, overrides, refusals (the plugin matrix is in test_matrix.py)."""

import itertools

import pytest
import torch

from lightningllm.errors import ConfigError
from lightningllm.models import Decoder
from lightningllm.registry import available


@pytest.mark.parametrize("ffn, norm", itertools.product(available("ffn"), available("norm")))
def test_every_ffn_and_norm_trains_in_a_decoder(decoder_factory, ffn, norm):
    torch.manual_seed(0)
    model = decoder_factory(ffn=ffn, norm=norm, vocab_size=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.arange(16).repeat(2, 2)[:, :24]  # a fixed cycle: perfectly predictable
    losses = []
    for _ in range(40):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_gpt2_initialisation_scales_residual_projections(decoder_factory):
    torch.manual_seed(0)
    model = decoder_factory(dim=256, n_layers=8, n_heads=4)
    o_std = torch.cat([b.attention.o_proj.weight.flatten() for b in model.blocks]).std().item()
    q_std = torch.cat([b.attention.q_proj.weight.flatten() for b in model.blocks]).std().item()
    assert q_std == pytest.approx(0.02, rel=0.05)
    assert o_std == pytest.approx(0.02 / (2 * 8) ** 0.5, rel=0.05)


def test_tied_embeddings_share_one_matrix(decoder_factory):
    tied, untied = decoder_factory(tie_embeddings=True), decoder_factory(tie_embeddings=False)
    assert tied.head.weight is tied.embed.weight
    assert untied.head.weight is not untied.embed.weight


def test_logit_scaling_divides_by_sqrt_dim(decoder_factory):
    torch.manual_seed(0)
    plain = decoder_factory().eval()
    scaled = decoder_factory(scale_logits=True).eval()
    scaled.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 50, (1, 6))
    torch.testing.assert_close(scaled(ids), plain(ids) / 32**0.5)


def test_config_rebuilds_the_same_model(llama_like):
    rebuilt = Decoder.from_config(llama_like.config)
    assert rebuilt.config == llama_like.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in llama_like.state_dict().items()
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dim": 30, "n_heads": 4}, "dim=30 is not divisible by n_heads=4"),
        ({"n_heads": 4, "n_kv_heads": 3}, "n_heads=4 is not divisible by n_kv_heads=3"),
        ({"n_layers": 0}, "n_layers=0"),
    ],
)
def test_impossible_shapes_are_refused(decoder_factory, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        decoder_factory(**kwargs)


def test_sequence_longer_than_learned_table_is_refused(decoder_factory):
    model = decoder_factory(position="LearnedPosition", max_seq_len=16)
    with pytest.raises(ConfigError, match="16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_dropout_is_active_only_in_training(decoder_factory):
    model = decoder_factory(dropout=0.5)
    ids = torch.randint(0, 50, (1, 8))
    model.train()
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_meta_device_build_then_materialise(decoder_factory, llama_like):
    with torch.device("meta"):
        model = Decoder.from_config(llama_like.config)
    model.to_empty(device="cpu")
    model.reset_parameters()
    assert all(not p.is_meta and torch.isfinite(p).all() for p in model.parameters())
    assert model(torch.randint(0, 50, (1, 5))).shape == (1, 5, 50)


def test_structural_keys_in_plugin_knobs_are_refused(decoder_factory):
    from functools import partial

    from lightningllm.registry import get

    with pytest.raises(ConfigError, match="n_kv_heads.*Set n_kv_heads on the model"):
        decoder_factory(attention=partial(get("attention", "MultiHeadAttention"), n_kv_heads=2))


def test_layer_overrides_swap_plugins_on_chosen_layers(decoder_factory, tmp_path):
    from functools import partial

    from lightningllm.io import export, load
    from lightningllm.models import LayerOverride
    from lightningllm.registry import get

    overrides = [
        LayerOverride(layers=[1, 3], ffn=get("ffn", "SwiGLU")),
        LayerOverride(layers=[3], attention=partial(get("attention", "MultiHeadAttention"), qk_norm=True)),
    ]
    model = decoder_factory(n_layers=4, overrides=overrides)
    assert [type(b.ffn).__name__ for b in model.blocks] == ["MLP", "SwiGLU", "MLP", "SwiGLU"]
    assert [b.attention.q_norm is not None for b in model.blocks] == [False, False, False, True]
    export(model, tmp_path / "export")
    loaded, _ = load(tmp_path / "export")
    ids = torch.randint(0, 50, (1, 7))
    torch.testing.assert_close(loaded(ids), model.eval()(ids))
    assert loaded.config["overrides"] == model.config["overrides"]


def test_override_of_a_missing_layer_is_refused(decoder_factory):
    from lightningllm.models import LayerOverride
    from lightningllm.registry import get

    with pytest.raises(ConfigError, match=r"layers \[2\].*0\.\.1"):
        decoder_factory(n_layers=2, overrides=[LayerOverride(layers=[2], ffn=get("ffn", "SwiGLU"))])
