"""Encoder: every registered combination builds and is bidirectional, padding is invisible, BERT's math."""

import itertools
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lightningllm.errors import ConfigError
from lightningllm.models import Decoder, Encoder
from lightningllm.models.base import TransformerStack
from lightningllm.registry import available, get

COMBINATIONS = list(itertools.product(available("position"), available("attention"), available("block")))
# (position, attention) pairs the math forbids, with a word the refusal must name
REFUSED = {("ALiBi", "LinearAttention"): "ALiBi", ("RelativePositionBias", "LinearAttention"): "RelativePositionBias"}


def build_encoder(
    *,
    vocab_size: int = 50,
    dim: int = 32,
    n_layers: int = 2,
    n_heads: int = 4,
    attention="MultiHeadAttention",
    ffn="MLP",
    norm="LayerNorm",
    position="LearnedPosition",
    block="PostNorm",
    max_seq_len: int = 64,
    **kwargs,
) -> Encoder:
    """A tiny Encoder from registered plugin names (or factories)."""

    def factory(kind: str, spec):
        return spec if callable(spec) else get(kind, spec)

    return Encoder(
        vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads,
        attention=factory("attention", attention), ffn=factory("ffn", ffn), norm=factory("norm", norm),
        position=factory("position", position), block=factory("block", block), max_seq_len=max_seq_len, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("position, attention, block", COMBINATIONS)
def test_every_combination_is_bidirectional_and_ignores_padding(position, attention, block):
    torch.manual_seed(0)
    kwargs = dict(position=position, attention=attention, block=block, n_kv_heads=2)
    if (position, attention) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[(position, attention)]):
            build_encoder(**kwargs)
        return
    model = build_encoder(**kwargs).eval()
    ids = torch.randint(5, 50, (2, 12))

    # forward and backward reach every parameter
    logits = model(ids)
    assert logits.shape == (2, 12, 50)
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    with torch.no_grad():
        # bidirectional: a later token changes the output at EVERY earlier position
        changed = ids.clone()
        changed[:, 9] = (ids[:, 9] + 1 - 5) % 45 + 5
        a, b = model.hidden_states(ids), model.hidden_states(changed)
        assert ((a[:, :9] - b[:, :9]).abs().amax(-1) > 1e-5).all()

        # padding: tokens past attention_mask change nothing of the real ones, which match the unpadded run
        real = torch.tensor([12, 8])
        attention_mask = torch.arange(12)[None] < real[:, None]  # (B, T)
        other_pads = torch.where(attention_mask, ids, torch.randint(5, 50, (2, 12)))
        padded = model(ids, attention_mask=attention_mask)
        torch.testing.assert_close(model(other_pads, attention_mask=attention_mask.long())[1, :8], padded[1, :8])
        torch.testing.assert_close(padded[1, :8], model(ids[1:, :8])[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(padded[0], model(ids[:1])[0], rtol=1e-4, atol=1e-5)


def reference_bert(model: Encoder, ids, attention_mask, segment_ids):
    """BERT's forward written out from the paper and Vaswani et al., reading the model's weights only."""
    n_heads, dim = 4, model.dim
    hd = dim // n_heads

    def layer_norm(norm, x):
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * (
            norm.weight
        ) + norm.bias

    def linear(layer, x):
        return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)

    B, T = ids.shape
    x = model.embed.weight[ids] + model.position.table.weight[:T] + model.segment_embed.weight[segment_ids]
    x = layer_norm(model.embed_norm, x)
    key_ok = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    for blk in model.blocks:
        att = blk.attention

        def heads(t):
            return t.view(B, T, n_heads, hd).transpose(1, 2)  # (B, H, T, hd)

        q, k, v = heads(linear(att.q_proj, x)), heads(linear(att.k_proj, x)), heads(linear(att.v_proj, x))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)  # (B, H, T, T), no causal mask
        probs = scores.masked_fill(~key_ok, float("-inf")).softmax(-1)
        y = (probs @ v).transpose(1, 2).reshape(B, T, dim)
        x = layer_norm(blk.norm_1, x + linear(att.o_proj, y))
        h = linear(blk.ffn.down_proj, F.gelu(linear(blk.ffn.up_proj, x)))
        x = layer_norm(blk.norm_2, x + h)
    hidden = x
    h = layer_norm(model.head.norm, F.gelu(linear(model.head.transform, hidden)))
    return hidden, h @ model.embed.weight.T + model.head.proj.bias


def test_bert_layout_matches_a_hand_written_reference():
    torch.manual_seed(0)
    model = build_encoder(n_segments=2, attention=partial(get("attention", "MultiHeadAttention"), bias=True))
    with torch.no_grad():  # non-trivial norms and head bias, so a mixed-up wiring shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    ids = torch.randint(5, 50, (2, 10))
    segment_ids = (torch.arange(10) >= 6).long().expand(2, 10)
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, 7:] = 0
    hidden, logits = reference_bert(model, ids, attention_mask, segment_ids)
    with torch.no_grad():
        got_hidden = model.hidden_states(ids, attention_mask=attention_mask, segment_ids=segment_ids)
        got_logits = model(ids, attention_mask=attention_mask, segment_ids=segment_ids)
    torch.testing.assert_close(got_hidden, hidden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-4)


def test_segments_change_the_output_and_default_to_segment_zero():
    torch.manual_seed(0)
    model = build_encoder(n_segments=2).eval()
    ids = torch.randint(5, 50, (1, 8))
    zeros, ones = torch.zeros_like(ids), torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(ids, segment_ids=zeros))
        assert not torch.allclose(model(ids, segment_ids=zeros), model(ids, segment_ids=ones))
    assert "segment_embed.weight" not in build_encoder().state_dict()
    with pytest.raises(ConfigError, match="n_segments=0"):
        build_encoder()(ids, segment_ids=zeros)
    with pytest.raises(ConfigError, match="n_segments=-1"):
        build_encoder(n_segments=-1)


@pytest.mark.parametrize("block, embed_norm, final_norm", [("PostNorm", True, False), ("PreNorm", False, True)])
def test_norm_placement_follows_the_block_layout(block, embed_norm, final_norm):
    model = build_encoder(block=block)
    assert isinstance(model.embed_norm, torch.nn.Identity) != embed_norm
    assert isinstance(model.norm, torch.nn.Identity) != final_norm


def test_tied_head_shares_the_embedding_and_keeps_its_bias():
    tied, untied = build_encoder(tie_embeddings=True), build_encoder(tie_embeddings=False)
    assert tied.head.proj.weight is tied.embed.weight
    assert untied.head.proj.weight is not untied.embed.weight
    assert tied.head.proj.bias.shape == (50,) and not tied.head.proj.bias.any()


def test_config_rebuilds_export_and_load_round_trip(tmp_path):
    from lightningllm.io import export, load

    torch.manual_seed(0)
    model = build_encoder(n_segments=2, ffn="SwiGLU", norm="RMSNorm", position="RoPE", block="PreNorm",
                          tie_embeddings=False)  # fmt: skip
    rebuilt = Encoder.from_config(model.config)
    assert rebuilt.config == model.config and model.config["n_segments"] == 2 and "scale_logits" not in model.config
    export(model, tmp_path / "export")
    loaded, tokenizer = load(tmp_path / "export")
    assert type(loaded) is Encoder and tokenizer is None
    ids = torch.randint(5, 50, (2, 9))
    mask, segments = torch.ones_like(ids), (torch.arange(9) > 4).long().expand(2, 9)
    mask[0, 6:] = 0
    inputs = dict(attention_mask=mask, segment_ids=segments)
    torch.testing.assert_close(loaded(ids, **inputs), model.eval()(ids, **inputs))


def test_meta_device_build_then_materialise():
    config = build_encoder(n_segments=2).config
    with torch.device("meta"):
        model = Encoder.from_config(config)
    model.to_empty(device="cpu")
    model.reset_parameters()
    assert all(not p.is_meta and torch.isfinite(p).all() for p in model.parameters())
    assert model.head.norm.weight.eq(1).all() and model.head.proj.bias.eq(0).all()
    assert model(torch.randint(0, 50, (1, 5))).shape == (1, 5, 50)


def test_shares_the_decoders_construction_and_checks():
    assert issubclass(Encoder, TransformerStack) and issubclass(Decoder, TransformerStack)
    assert not issubclass(Encoder, Decoder)
    with pytest.raises(ConfigError, match="dim=30 is not divisible by n_heads=4"):
        build_encoder(dim=30)
    with pytest.raises(ConfigError, match=r"Set n_kv_heads on the model \(Encoder\)"):
        build_encoder(attention=partial(get("attention", "MultiHeadAttention"), n_kv_heads=2))
    with pytest.raises(ConfigError, match="16"):
        build_encoder(max_seq_len=16)(torch.zeros(1, 17, dtype=torch.long))
    from lightningllm.models import LayerOverride

    model = build_encoder(n_layers=3, overrides=[LayerOverride(layers=[1], ffn=get("ffn", "SwiGLU"))])
    assert [type(b.ffn).__name__ for b in model.blocks] == ["MLP", "SwiGLU", "MLP"]
    std = torch.cat([b.attention.o_proj.weight.flatten() for b in model.blocks]).std().item()
    assert std == pytest.approx(0.02 / math.sqrt(2 * 3), rel=0.1)


def test_learns_a_task_that_needs_the_future():
    """Predict the LAST token at the first position: impossible for a causal model, easy for an encoder."""
    torch.manual_seed(0)
    model = build_encoder(vocab_size=16, block="PreNorm")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(5, 16, (64, 8))
    inputs = ids.clone()
    inputs[:, 0] = 4  # <mask>
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(model(inputs)[:, 0], ids[:, -1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
