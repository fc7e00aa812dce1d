"""EncoderDecoder: bidirectional encoder, causal decoder with cross-attention, cached decoding, export, encoders."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightningllm.errors import ConfigError, UnsafeConfigError
from lightningllm.generation import generate
from lightningllm.io import export, load
from lightningllm.models.encoder_decoder import ConditionedDecoder, EncoderDecoder, EncoderStack
from lightningllm.registry import get

V = 40


def build(
    *,
    block: str = "PreNorm",
    attention: str = "MultiHeadAttention",
    position: str = "RoPE",
    encoder: nn.Module | None = None,
    **kwargs,
) -> EncoderDecoder:
    torch.manual_seed(0)
    defaults = {"n_encoder_layers": 3} if encoder is None else {}
    return EncoderDecoder(
        vocab_size=V, dim=32, n_layers=2, n_heads=4, attention=get("attention", attention), ffn=get("ffn", "MLP"),
        norm=get("norm", "LayerNorm"), position=get("position", position), block=get("block", block), max_seq_len=32,
        encoder=encoder, **{**defaults, **kwargs},
    ).eval()  # fmt: skip


def ids(*shape: int, seed: int = 1) -> Tensor:
    return torch.randint(5, V, shape, generator=torch.Generator().manual_seed(seed))


LAYOUTS = ["PreNorm", "PostNorm", "Parallel"]


@pytest.mark.parametrize("block", LAYOUTS)
def test_decoder_is_causal_and_reads_the_whole_source(block):
    model = build(block=block)
    src, tgt = ids(2, 9), ids(2, 8, seed=2)
    logits = model(src, tgt)
    assert logits.shape == (2, 8, V)
    later = tgt.clone()
    later[:, 5:] = ids(2, 3, seed=3)
    torch.testing.assert_close(model(src, later)[:, :5], logits[:, :5])  # earlier logits never see later targets
    assert not torch.allclose(model(src, later)[:, 5:], logits[:, 5:])
    source = src.clone()
    source[:, -1] = (source[:, -1] + 1 - 5) % (V - 5) + 5  # the last source token reaches every target position
    assert not torch.allclose(model(source, tgt)[:, 0], logits[:, 0])


@pytest.mark.parametrize("block", LAYOUTS)
def test_encoder_is_bidirectional(block):
    model = build(block=block)
    src = ids(2, 9)
    context, padding = model.encode(src)
    assert context.shape == (2, 9, 32) and padding is None
    changed = src.clone()
    changed[:, -1] = (changed[:, -1] + 1 - 5) % (V - 5) + 5
    assert not torch.allclose(model.encode(changed)[0][:, 0], context[:, 0])  # an earlier output sees a later token


@pytest.mark.parametrize("block", LAYOUTS)
def test_source_padding_changes_nothing_for_real_tokens(block):
    model = build(block=block, position="LearnedPosition")
    src, tgt = ids(2, 6), ids(2, 5, seed=2)
    alone_context, _ = model.encode(src)
    alone = model(src, tgt)
    padded = torch.cat([src, ids(2, 4, seed=4)], dim=1)  # 4 padding tokens of arbitrary content
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[:, 6:] = 0
    context, padding = model.encode(padded, attention_mask=mask)
    assert padding.dtype == torch.bool and torch.equal(padding, mask.bool())
    torch.testing.assert_close(context[:, :6], alone_context, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(padded, tgt, attention_mask=mask), alone, atol=1e-5, rtol=1e-5)
    other = padded.clone()
    other[:, 6:] = ids(2, 4, seed=5)
    torch.testing.assert_close(model(other, tgt, attention_mask=mask), alone, atol=1e-5, rtol=1e-5)


CACHE_CASES = [
    ("PreNorm", "MultiHeadAttention", {}),
    ("PostNorm", "MultiHeadAttention", {"n_kv_heads": 2}),
    ("Parallel", "MultiHeadAttention", {}),
    ("PreNorm", "LinearAttention", {}),
    ("PreNorm", "MultiHeadAttention", {"cross_attention": get("attention", "LinearAttention")}),
]


@pytest.mark.parametrize("block, attention, kwargs", CACHE_CASES)
def test_cached_decoding_equals_the_full_pass_at_every_step(block, attention, kwargs):
    model = build(block=block, attention=attention, **kwargs)
    src, tgt = ids(2, 9), ids(2, 8, seed=2)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    full = model(src, tgt, attention_mask=mask)  # (B, T, V)
    decoder = model.decoder_for(src, attention_mask=mask)
    cache = decoder.make_cache(2, 8)
    stepped = torch.cat([decoder(tgt[:, t : t + 1], cache=cache) for t in range(8)], dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)
    assert all(c.length == 9 for c in cache.cross_attention) and cache[0].length == 8
    # a prompt of several tokens, then single steps
    cache = decoder.make_cache(2, 8)
    torch.testing.assert_close(decoder(tgt[:, :5], cache=cache), full[:, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoder(tgt[:, 5:6], cache=cache), full[:, 5:6], atol=1e-5, rtol=1e-5)


def test_generate_encodes_once_and_matches_greedy_decoding_without_cache():
    model = build()
    src = ids(2, 9)
    calls = []
    encode = model.encoder.encode
    model.encoder.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    decoder = model.decoder_for(src)
    start = torch.full((2, 1), model.decoder_start_id)
    out = generate(decoder, start, 10, temperature=0).clone()
    assert out.shape == (2, 11) and len(calls) == 1
    with torch.no_grad():
        expected = start
        for _ in range(10):  # greedy, re-running encoder and decoder on everything each step
            expected = torch.cat([expected, model(src, expected)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, expected)
    # the decoding window slides past max_seq_len (32): the self-attention caches restart, the context stays
    assert generate(decoder, start, 40, temperature=0).shape == (2, 41)


def test_one_source_serves_every_row_and_a_wrong_batch_is_refused():
    model = build()
    decoder = model.decoder_for(ids(1, 9))
    tgt = ids(3, 4, seed=2)
    torch.testing.assert_close(decoder(tgt), model(ids(1, 9).expand(3, -1), tgt))
    with pytest.raises(ConfigError, match="bound to 2 encoded source"):
        model.decoder_for(ids(2, 9)).make_cache(3, 8)


def test_shift_right_starts_with_the_start_token_and_pads_ignored_labels():
    model = build()
    labels = torch.tensor([[7, 8, 9, 3], [7, 3, -100, -100]])
    assert torch.equal(model.shift_right(labels), torch.tensor([[2, 7, 8, 9], [2, 7, 3, 0]]))
    with pytest.raises(ConfigError, match="decoder_input_ids"):
        model(labels.clamp(min=0))
    other = build(pad_id=5, decoder_start_id=1)  # with pad_id 0, clamping -100 to 0 would pass the check above
    assert torch.equal(other.shift_right(labels), torch.tensor([[1, 7, 8, 9], [1, 7, 3, 5]]))


def test_shared_embedding_and_tied_head():
    model = build()
    assert model.decoder.embed is model.encoder.embed and model.head.weight is model.encoder.embed.weight
    untied = build(tie_embeddings=False, scale_logits=True)
    assert untied.head.weight is not untied.decoder.embed.weight
    assert untied.decoder.embed is untied.encoder.embed  # the stacks still share their input embedding


@pytest.mark.parametrize("block", ["PreNorm", "PostNorm"])
def test_export_load_round_trip(tmp_path, block):
    model = build(block=block, n_kv_heads=2, cross_attention=partial(get("attention", "MultiHeadAttention"), bias=True))
    src, tgt = ids(2, 9), ids(2, 6, seed=2)
    export(model, tmp_path / "export")
    loaded, tokenizer = load(tmp_path / "export")
    assert type(loaded) is EncoderDecoder and tokenizer is None and loaded.config == model.config
    assert loaded.config["cross_attention"]["init_args"] == {"bias": True} and loaded.n_encoder_layers == 3
    torch.testing.assert_close(loaded(src, tgt), model(src, tgt))


def test_it_trains_to_copy_the_source():
    model = build().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    src = ids(16, 8)
    tgt = torch.cat([src, torch.full((16, 1), 3)], dim=1)  # copy, then <eos>
    losses = []
    for _ in range(30):
        logits = model(src, model.shift_right(tgt))
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


class FakePerceiver(nn.Module):
    """A minimal latent encoder: N learned latents cross-attend once to the embedded input."""

    def __init__(self, vocab_size: int, dim: int, n_latents: int = 5) -> None:
        super().__init__()
        self.config = {"vocab_size": vocab_size, "dim": dim, "n_latents": n_latents}
        self.dim = dim
        self.embed = nn.Embedding(vocab_size, dim)
        self.latents = nn.Parameter(torch.randn(n_latents, dim))
        self.calls = 0

    @classmethod
    def from_config(cls, config: dict) -> "FakePerceiver":
        return cls(**config)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, None]:
        self.calls += 1
        x = self.embed(input_ids)  # (B, S, dim)
        scores = self.latents @ x.transpose(1, 2) / self.dim**0.5  # (B, N, S)
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask.bool()[:, None, :], float("-inf"))
        return scores.softmax(-1) @ x, None  # (B, N, dim)


def test_a_custom_encoder_plugs_in_decodes_with_cache_and_round_trips(tmp_path):
    model = build(encoder=FakePerceiver(V, 32))
    assert not isinstance(model.encoder, EncoderStack) and model.n_encoder_layers is None
    assert model.config["encoder"] == {
        "class_path": f"{FakePerceiver.__module__}.FakePerceiver",
        "init_args": {"vocab_size": V, "dim": 32, "n_latents": 5},
    }
    src, tgt = ids(2, 9), ids(2, 6, seed=2)
    full = model(src, tgt)
    assert full.shape == (2, 6, V) and model.encoder.calls == 1
    decoder = model.decoder_for(src)
    assert isinstance(decoder, ConditionedDecoder) and decoder.context.shape == (2, 5, 32)
    cache = decoder.make_cache(2, 6)
    stepped = torch.cat([decoder(tgt[:, t : t + 1], cache=cache) for t in range(6)], dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)
    assert model.encoder.calls == 2 and cache.cross_attention[0].length == 5
    export(model, tmp_path / "export")
    with pytest.raises(UnsafeConfigError, match="FakePerceiver"):  # a class outside lightningllm and its plugins
        load(tmp_path / "export")
    loaded, _ = load(tmp_path / "export", trust_code=True)
    assert isinstance(loaded.encoder, FakePerceiver) and loaded.config == model.config
    torch.testing.assert_close(loaded(src, tgt), full)


def test_impossible_settings_are_refused():
    with pytest.raises(ConfigError, match="has dim=16"):
        build(encoder=FakePerceiver(V, 16))
    with pytest.raises(ConfigError, match="n_encoder_layers=2"):
        build(encoder=FakePerceiver(V, 32), n_encoder_layers=2)
    with pytest.raises(ConfigError, match="no encode method"):
        build(encoder=nn.Linear(32, 32))
    with pytest.raises(ConfigError, match="decoder_start_id=40"):
        build(decoder_start_id=40)
    with pytest.raises(ConfigError, match="cross_attention init_args set n_heads|attention init_args set n_heads"):
        build(cross_attention=partial(get("attention", "MultiHeadAttention"), n_heads=2))


def test_decoder_position_gives_the_decoder_its_own_plugin(tmp_path):
    """T5: a bidirectional relative bias in the encoder, a causal one in the decoder; both survive export/load."""
    bias = get("position", "RelativePositionBias")
    model = build(position="RelativePositionBias", decoder_position=partial(bias, bidirectional=False))
    assert model.encoder.position.bidirectional and not model.decoder.position.bidirectional
    assert model.encoder.position.table.weight is not model.decoder.position.table.weight
    assert model.config["position"]["init_args"] == {}
    assert model.config["decoder_position"] == {"class_path": "RelativePositionBias",
                                                "init_args": {"bidirectional": False}}  # fmt: skip
    src, tgt = ids(2, 7), ids(2, 5, seed=2)
    export(model, tmp_path / "export")
    loaded, _ = load(tmp_path / "export")
    assert not loaded.decoder.position.bidirectional
    torch.testing.assert_close(loaded(src, tgt), model(src, tgt))
    # cached decoding sees the same causal bias as teacher forcing
    out = generate(model.decoder_for(src), torch.full((2, 1), model.decoder_start_id), 6, temperature=0.0)
    with torch.no_grad():
        logits = model(src, out[:, :-1])
    assert torch.equal(logits.argmax(-1), out[:, 1:])


def test_decoder_for_keeps_the_training_flag():
    model = build()
    generate(model.decoder_for(ids(1, 5)), torch.full((1, 1), 2), 3, temperature=0.0)
    assert not model.training  # an eval model stays in eval mode (dropout off) after sampling
    model.train()
    generate(model.decoder_for(ids(1, 5)), torch.full((1, 1), 2), 3, temperature=0.0)
    assert model.training
