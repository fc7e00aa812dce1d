import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention

import lightningllm_plugins.attention.sliding_window as sliding_window
from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask
from lightningllm.models import Decoder, LayerOverride
from lightningllm.registry import available, get
from lightningllm_plugins.attention.multi_head import MultiHeadAttention
from lightningllm_plugins.attention.sliding_window import SlidingWindowAttention
from lightningllm_plugins.position.alibi import ALiBi
from lightningllm_plugins.position.no_position import NoPosition
from lightningllm_plugins.position.rope import RoPE

DIM, N_HEADS = 32, 4


def make_position(name, n_heads=N_HEADS):
    cls = {"none": NoPosition, "rope": RoPE, "alibi": ALiBi}[name]
    return cls(dim=DIM, n_heads=n_heads, head_dim=DIM // n_heads, max_seq_len=64)


def make_attention(n_kv_heads=2, n_heads=N_HEADS, seed=0, **knobs):
    torch.manual_seed(seed)
    return SlidingWindowAttention(dim=DIM, n_heads=n_heads, n_kv_heads=n_kv_heads, **knobs).double()


def naive_pattern(T, *, window=None, global_tokens=0, block_size=None, causal=True, padding=None, prefix=None, B=2):
    """(B, T, T) bool from explicit loops over absolute positions 0..T-1 (no cache)."""
    allowed = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                if block_size is None:
                    near = abs(i - j) < window
                else:
                    near = abs(i // block_size - j // block_size) <= 1
                near = near or i < global_tokens or j < global_tokens
                seen = not causal or j <= i or (prefix is not None and i < prefix[b] and j < prefix[b])
                real = padding is None or bool(padding[b, j])
                allowed[b, i, j] = near and seen and real
    return allowed


def naive_attention(attention, x, allowed, *, position, alibi=False):
    """softmax(Q K^T / sqrt(hd) - ALiBi, masked) V with explicit per-head loops; all-masked rows give 0."""
    B, T, _ = x.shape
    H, Hkv, hd = attention.n_heads, attention.n_kv_heads, attention.head_dim
    q = attention.q_proj(x).view(B, T, H, hd).transpose(1, 2)
    k = attention.k_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
    v = attention.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
    q, _ = position.rotate(q, q, torch.arange(T)[None])
    k, _ = position.rotate(k, k, torch.arange(T)[None])
    out = torch.zeros(B, H, T, hd, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)
            scores = q[b, h] @ k[b, kv].T / math.sqrt(hd)  # (T, T)
            if alibi:
                slope = 2.0 ** (-8.0 * (h + 1) / H)
                i, j = torch.arange(T, dtype=x.dtype)[:, None], torch.arange(T, dtype=x.dtype)[None]
                scores = scores - slope * (i - j).abs()
            scores = scores.masked_fill(~allowed[b], float("-inf"))
            out[b, h] = torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v[b, kv]
    return attention.o_proj(out.transpose(1, 2).reshape(B, T, H * hd))


def run(attention, x, position, mask=None, **kwargs):
    T = x.shape[1]
    mask = mask if mask is not None else AttentionMask()
    return attention(x, position=position, positions=torch.arange(T)[None], mask=mask, **kwargs)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("position_name", ["none", "rope", "alibi"])
@pytest.mark.parametrize("window", [1, 3, 5, 12])
def test_window_matches_naive_mask(n_kv_heads, position_name, window):
    B, T = 2, 9
    attention = make_attention(n_kv_heads, window=window)
    position = make_position(position_name)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    expected = naive_attention(
        attention, x, naive_pattern(T, window=window), position=position, alibi=position_name == "alibi"
    )
    torch.testing.assert_close(run(attention, x, position), expected)


def test_window_at_least_the_length_is_full_causal_attention():
    T = 9
    attention = make_attention(2, window=T)
    full = MultiHeadAttention(dim=DIM, n_heads=N_HEADS, n_kv_heads=2).double()
    full.load_state_dict(attention.state_dict())
    x = torch.randn(2, T, DIM, dtype=torch.float64)
    for name in ("rope", "alibi"):
        torch.testing.assert_close(run(attention, x, make_position(name)), run(full, x, make_position(name)))
    narrow = make_attention(2, window=T - 1)
    assert not torch.allclose(run(narrow, x, make_position("rope")), run(full, x, make_position("rope")))


PATTERNS = {
    "global": {"window": 2, "global_tokens": 2},
    "block": {"block_size": 3},
    "block_global": {"block_size": 2, "global_tokens": 1},
    "block_1": {"block_size": 1},
}
MASKS = {
    "causal": lambda T: {},
    "left_padding": lambda T: {"padding": torch.arange(T)[None] >= torch.tensor([[0], [3]])},
    "prefix": lambda T: {"prefix_lengths": torch.tensor([4, 6])},
    "bidirectional": lambda T: {"causal": False, "padding": torch.arange(T)[None] < torch.tensor([[T], [T - 2]])},
}


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("position_name", ["rope", "alibi"])
def test_global_tokens_and_blocks_match_naive_mask(pattern, mask_name, position_name):
    B, T = 2, 10
    knobs = PATTERNS[pattern]
    attention = make_attention(2, **knobs)
    position = make_position(position_name)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    fields = MASKS[mask_name](T)
    out = run(attention, x, position, AttentionMask(**fields))
    naive_mask = {"causal": fields.get("causal", True), "padding": fields.get("padding"),
                  "prefix": fields.get("prefix_lengths")}  # fmt: skip
    naive_knobs = {"window": knobs.get("window"), "global_tokens": knobs.get("global_tokens", 0),
                   "block_size": knobs.get("block_size")}  # fmt: skip
    allowed = naive_pattern(T, **naive_knobs, **naive_mask)
    expected = naive_attention(attention, x, allowed, position=position, alibi=position_name == "alibi")
    torch.testing.assert_close(out, expected)


def test_window_agrees_with_the_models_own_window_and_documents():
    T = 10
    attention = make_attention(2, window=3)
    reference = MultiHeadAttention(dim=DIM, n_heads=N_HEADS, n_kv_heads=2).double()
    reference.load_state_dict(attention.state_dict())
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    x = torch.randn(1, T, DIM, dtype=torch.float64)
    rope = make_position("rope")
    out = attention(x, position=rope, positions=positions, mask=AttentionMask(document_ids=docs))
    expected = reference(x, position=rope, positions=positions, mask=AttentionMask(window=3, document_ids=docs))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("knobs", [{"window": 3}, {"window": 2, "global_tokens": 2}, {"block_size": 3}])
@pytest.mark.parametrize("position_name", ["none", "rope", "alibi"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_kv_cache_decoding_matches_full_forward(knobs, position_name, chunk):
    B, T, prefill = 2, 11, 4
    attention = make_attention(2, **knobs)
    position = make_position(position_name)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    full = run(attention, x, position)
    cache = attention.make_cache(B, 16, dtype=torch.float64)
    outs = [run(attention, x[:, :prefill], position, cache=cache)]
    for start in range(prefill, T, chunk):
        end = min(start + chunk, T)
        outs.append(attention(x[:, start:end], position=position, positions=torch.arange(start, end)[None],
                              mask=AttentionMask(), cache=cache))  # fmt: skip
    assert cache.length == T
    torch.testing.assert_close(torch.cat(outs, dim=1), full)


@pytest.mark.parametrize("knobs", [{"window": 3}, {"window": 2, "global_tokens": 2}, {"block_size": 2}])
@pytest.mark.parametrize("position_name", ["none", "rope", "alibi"])
def test_future_tokens_never_change_the_past(knobs, position_name):
    B, T, cut = 2, 10, 5
    attention = make_attention(2, **knobs)
    position = make_position(position_name)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    changed = x.clone()
    changed[:, cut:] = torch.randn(B, T - cut, DIM, dtype=torch.float64)
    a, b = run(attention, x, position), run(attention, changed, position)
    torch.testing.assert_close(a[:, :cut], b[:, :cut])
    assert not torch.allclose(a[:, cut:], b[:, cut:])


@pytest.mark.parametrize("position", ["LearnedPosition", "RoPE", "ALiBi", "NoPosition"])
def test_a_token_beyond_the_window_does_not_reach_later_positions(position):
    torch.manual_seed(0)
    window, t = 3, 4
    model = Decoder(vocab_size=20, dim=DIM, n_layers=1, n_heads=N_HEADS,
                    attention=partial(SlidingWindowAttention, window=window), ffn=get("ffn", "MLP"),
                    norm=get("norm", "LayerNorm"), position=get("position", position), block=get("block", "PreNorm"),
                    max_seq_len=32).eval()  # fmt: skip
    ids = torch.randint(0, 20, (2, 12))
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 1) % 20
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, t + window :], b[:, t + window :])  # out of reach
    torch.testing.assert_close(a[:, :t], b[:, :t])  # causality
    assert not torch.allclose(a[:, t + window - 1], b[:, t + window - 1])  # the last position that sees it


def test_global_tokens_reach_every_position():
    attention = make_attention(2, window=2, global_tokens=1)
    x = torch.randn(1, 12, DIM, dtype=torch.float64)
    changed = x.clone()
    changed[:, 0] += 1.0
    a, b = run(attention, x, make_position("rope")), run(attention, changed, make_position("rope"))
    assert not torch.isclose(a, b).all(dim=-1).any()  # every position sees token 0


def test_default_runs_masked_sdpa_on_cpu(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    attention = make_attention(2, n_heads=2, window=3)  # head_dim 16: flex-eligible but for the device
    run(attention, torch.randn(1, 6, DIM, dtype=torch.float64), make_position("rope", n_heads=2))
    assert len(calls) == 1 and calls[0].dtype == torch.bool
    assert calls[0][0, 0].tolist() == naive_pattern(6, window=3, B=1)[0].tolist()


FLEX_MASKS = {
    "causal": lambda T: {},
    "left_padding": lambda T: {"padding": torch.arange(T)[None] >= torch.tensor([[0], [3]])},
    "prefix": lambda T: {"prefix_lengths": torch.tensor([4, 6])},
    "documents": lambda T: {"document_ids": (torch.arange(T)[None] >= torch.tensor([[5], [7]])).long()},
    "bidirectional": lambda T: {"causal": False, "window": 4},
}


@pytest.mark.parametrize("knobs", [{"window": 3}, {"window": 2, "global_tokens": 2}, {"block_size": 3}])
@pytest.mark.parametrize("mask_name", list(FLEX_MASKS))
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_path_matches_the_mask_path(monkeypatch, knobs, mask_name):
    B, T = 2, 12
    attention = make_attention(1, n_heads=2, **knobs)  # grouped: both query heads read one key/value head
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    mask = AttentionMask(**FLEX_MASKS[mask_name](T))
    position = make_position("rope", n_heads=2)
    positions = torch.arange(T)[None]
    if mask_name == "documents":  # packed: positions restart per document
        starts = torch.tensor([[5], [7]])
        positions = torch.where(torch.arange(T)[None] >= starts, torch.arange(T)[None] - starts, torch.arange(T)[None])
    expected = attention(x, position=position, positions=positions, mask=mask)

    monkeypatch.setattr(sliding_window, "FLEX_DEVICES", ("cpu",))
    monkeypatch.setattr(sliding_window, "_flex_attention", lambda: flex_attention.flex_attention)  # eager
    used, create_block_mask = [], flex_attention.create_block_mask
    monkeypatch.setattr(
        flex_attention, "create_block_mask", lambda *a, **k: used.append(1) or create_block_mask(*a, **k)
    )
    cache = attention.make_cache(B, T, dtype=torch.float64)
    with torch.no_grad():  # FlexAttention has no backward on CPU
        out = attention(x, position=position, positions=positions, mask=mask, cache=cache)
    assert used and cache.length == T
    real = torch.ones(B, T, 1, dtype=torch.bool) if mask.padding is None else mask.padding[..., None]
    torch.testing.assert_close(out * real, expected * real)


def test_per_layer_windows_through_decoder_overrides(tmp_path):
    from lightningllm.io import export, load

    overrides = [
        LayerOverride(layers=[0, 2], attention=partial(SlidingWindowAttention, window=2)),
        LayerOverride(layers=[1], attention=partial(SlidingWindowAttention, block_size=4, global_tokens=1)),
    ]
    torch.manual_seed(0)
    model = Decoder(vocab_size=20, dim=DIM, n_layers=4, n_heads=N_HEADS, n_kv_heads=2,
                    attention=get("attention", "MultiHeadAttention"), ffn=get("ffn", "MLP"),
                    norm=get("norm", "RMSNorm"), position=get("position", "RoPE"), block=get("block", "PreNorm"),
                    max_seq_len=32, overrides=overrides).eval()  # fmt: skip
    kinds = [(type(b.attention).__name__, getattr(b.attention, "window", None)) for b in model.blocks]
    assert kinds == [("SlidingWindowAttention", 2), ("SlidingWindowAttention", 256),
                     ("SlidingWindowAttention", 2), ("MultiHeadAttention", None)]  # fmt: skip
    assert model.blocks[1].attention.block_size == 4 and model.blocks[1].attention.global_tokens == 1
    ids = torch.randint(0, 20, (2, 10))
    export(model, tmp_path / "export")
    loaded, _ = load(tmp_path / "export")
    torch.testing.assert_close(loaded(ids), model(ids))
    # decoding through the model's caches reproduces the full forward
    cache = model.make_cache(2, 16)
    with torch.no_grad():
        steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(5, 10)]
        torch.testing.assert_close(torch.cat(steps, dim=1), model(ids))


@pytest.mark.parametrize(
    "knobs, match",
    [
        ({"window": 0}, "window=0"),
        ({"window": 2.5}, "window=2.5"),
        ({"global_tokens": -1}, "global_tokens=-1"),
        ({"block_size": 0}, "block_size=0"),
        ({"dim": 30}, "dim=30"),
    ],
)
def test_refuses_bad_knobs(knobs, match):
    with pytest.raises(ConfigError, match=match):
        SlidingWindowAttention(**{"dim": DIM, "n_heads": N_HEADS, **knobs})


def test_registered():
    assert "SlidingWindowAttention" in available("attention")
    assert get("attention", "SlidingWindowAttention") is SlidingWindowAttention


def test_it_trains_previous_token_copy_in_a_decoder():
    torch.manual_seed(0)
    vocab, T = 12, 16
    model = Decoder(vocab_size=vocab, dim=DIM, n_layers=1, n_heads=N_HEADS, n_kv_heads=2,
                    attention=partial(SlidingWindowAttention, window=2), ffn=get("ffn", "MLP"),
                    norm=get("norm", "RMSNorm"), position=get("position", "RoPE"), block=get("block", "PreNorm"),
                    max_seq_len=T)  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        x = torch.randint(vocab, (16, T))
        logits = model(x)
        loss = F.cross_entropy(logits[:, 1:].reshape(-1, vocab), x[:, :-1].reshape(-1))  # predict the previous token
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5
