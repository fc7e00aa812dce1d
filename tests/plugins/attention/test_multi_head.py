import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightningllm.cache import KVCache
from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask
from lightningllm_plugins.attention.multi_head import MultiHeadAttention
from lightningllm_plugins.position.alibi import ALiBi
from lightningllm_plugins.position.no_position import NoPosition
from lightningllm_plugins.position.rope import RoPE

DIM, N_HEADS, HEAD_DIM = 32, 4, 8


def make_position(name, n_heads=N_HEADS):
    cls = {"none": NoPosition, "rope": RoPE, "alibi": ALiBi}[name]
    return cls(dim=DIM, n_heads=n_heads, head_dim=DIM // n_heads, max_seq_len=64)


def make_attention(n_kv_heads=N_HEADS, seed=0, **knobs):
    torch.manual_seed(seed)
    attention = MultiHeadAttention(dim=DIM, n_heads=N_HEADS, n_kv_heads=n_kv_heads, dropout=0.0, **knobs)
    if attention.q_norm is not None:  # non-trivial norm scales
        nn.init.uniform_(attention.q_norm.weight, 0.5, 1.5)
        nn.init.uniform_(attention.k_norm.weight, 0.5, 1.5)
    return attention.double()


def naive_allowed(B, T, S, *, causal=True, padding=None, prefix_lengths=None, q_offset=0):
    """(B, T, S) bool from explicit loops; query t sits at position q_offset + t, key j at position j."""
    allowed = torch.ones(B, T, S, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            i = q_offset + t
            for j in range(S):
                ok = True
                if causal:
                    in_prefix = prefix_lengths is not None and i < prefix_lengths[b] and j < prefix_lengths[b]
                    ok = j <= i or in_prefix
                if padding is not None:
                    ok = ok and bool(padding[b, j])
                allowed[b, t, j] = ok
    return allowed


def naive_slopes(n):
    return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]  # power-of-two head counts only


def naive_attention(attention, x, allowed, *, position=None, alibi=False, context=None, q_offset=0):
    """softmax(Q K^T / sqrt(hd) + bias, masked) V with explicit per-head loops; all-masked rows give 0."""
    B, T, _ = x.shape
    src = x if context is None else context
    S = src.shape[1]
    H, Hkv, hd = attention.n_heads, attention.n_kv_heads, attention.head_dim
    q = attention.q_proj(x).view(B, T, H, hd).transpose(1, 2)
    k = attention.k_proj(src).view(B, S, Hkv, hd).transpose(1, 2)
    v = attention.v_proj(src).view(B, S, Hkv, hd).transpose(1, 2)
    if attention.q_norm is not None:
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * attention.q_norm.weight
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * attention.k_norm.weight
    if position is not None and context is None:
        q, _ = position.rotate(q, q, torch.arange(q_offset, q_offset + T)[None])
        k, _ = position.rotate(k, k, torch.arange(S)[None])
    out = torch.zeros(B, H, T, hd, dtype=x.dtype)
    slopes = naive_slopes(H)
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)  # the key/value head this query head reads
            scores = q[b, h] @ k[b, kv].T / math.sqrt(hd)  # (T, S)
            if alibi:
                i = torch.arange(q_offset, q_offset + T, dtype=x.dtype)[:, None]
                j = torch.arange(S, dtype=x.dtype)[None]
                scores = scores - slopes[h] * (i - j).abs()
            scores = scores.masked_fill(~allowed[b], float("-inf"))
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all-masked row: zeros
            out[b, h] = probs @ v[b, kv]
    return attention.o_proj(out.transpose(1, 2).reshape(B, T, H * hd))


MASKS = {
    "causal": lambda B, T: {},
    "right_padding": lambda B, T: {"padding": torch.arange(T)[None] < torch.tensor([[T], [T - 2]])},
    "left_padding": lambda B, T: {"padding": torch.arange(T)[None] >= torch.tensor([[0], [3]])},
    "prefix": lambda B, T: {"prefix_lengths": torch.tensor([3, 5])},
}


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("position_name", ["none", "rope", "alibi"])
def test_matches_naive_attention(n_kv_heads, mask_name, position_name):
    B, T = 2, 7
    attention = make_attention(n_kv_heads)
    position = make_position(position_name)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    fields = MASKS[mask_name](B, T)
    mask = AttentionMask(causal=True, **fields)
    out = attention(x, position=position, positions=torch.arange(T)[None], mask=mask)
    allowed = naive_allowed(B, T, T, **fields)
    expected = naive_attention(attention, x, allowed, position=position, alibi=position_name == "alibi")
    torch.testing.assert_close(out, expected)


def test_bidirectional_with_qk_norm_and_bias():
    B, T = 2, 5
    attention = make_attention(2, qk_norm=True, bias=True)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        nn.init.normal_(getattr(attention, name).bias)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    padding = torch.tensor([[True] * 5, [True, True, True, False, False]])
    position = make_position("rope")
    out = attention(
        x, position=position, positions=torch.arange(T)[None], mask=AttentionMask(causal=False, padding=padding)
    )
    expected = naive_attention(attention, x, naive_allowed(B, T, T, causal=False, padding=padding), position=position)
    torch.testing.assert_close(out, expected)


def test_sliding_window_and_documents_follow_the_mask():
    B, T = 1, 8
    attention = make_attention(2)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])  # packed: positions restart per document
    mask = AttentionMask(causal=True, window=3, document_ids=docs)
    out = attention(x, position=make_position("none"), positions=positions, mask=mask)
    allowed = torch.zeros(B, T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            allowed[0, i, j] = docs[0, i] == docs[0, j] and j <= i and i - j < 3
    torch.testing.assert_close(out, naive_attention(attention, x, allowed))


def test_gqa_with_all_heads_equals_mha():
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    kwargs = {"position": make_position("rope"), "positions": torch.arange(6)[None], "mask": AttentionMask()}
    default = make_attention(None, seed=3)
    explicit = make_attention(N_HEADS, seed=3)
    torch.testing.assert_close(default(x, **kwargs), explicit(x, **kwargs))
    assert default.n_kv_heads == N_HEADS


@pytest.mark.parametrize("n_kv_heads", [2, 1])
@pytest.mark.parametrize("mask_name", ["causal", "left_padding"])
def test_gqa_equals_mha_with_duplicated_kv_weights(n_kv_heads, mask_name):
    B, T = 2, 6
    gqa = make_attention(n_kv_heads, seed=1)
    mha = make_attention(N_HEADS, seed=2)
    group = N_HEADS // n_kv_heads
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            per_head = getattr(gqa, name).weight.view(n_kv_heads, HEAD_DIM, DIM)
            getattr(mha, name).weight.copy_(per_head.repeat_interleave(group, dim=0).reshape(DIM, DIM))
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    mask = AttentionMask(**MASKS[mask_name](B, T))
    kwargs = {"position": make_position("rope"), "positions": torch.arange(T)[None], "mask": mask}
    torch.testing.assert_close(gqa(x, **kwargs), mha(x, **kwargs))


@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("position_name", ["none", "rope", "alibi"])
@pytest.mark.parametrize("chunk", [1, 2])
def test_kv_cache_decoding_matches_full_forward(n_kv_heads, position_name, chunk):
    B, T, prefill = 2, 9, 4
    attention = make_attention(n_kv_heads)
    position = make_position(position_name)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    mask = AttentionMask(causal=True)
    full = attention(x, position=position, positions=torch.arange(T)[None], mask=mask)

    cache = attention.make_cache(B, 16, dtype=torch.float64)
    outs = [attention(x[:, :prefill], position=position, positions=torch.arange(prefill)[None], mask=mask, cache=cache)]
    for start in range(prefill, T, chunk):
        end = min(start + chunk, T)
        positions = torch.arange(start, end)[None]
        outs.append(attention(x[:, start:end], position=position, positions=positions, mask=mask, cache=cache))
    assert cache.length == T
    torch.testing.assert_close(torch.cat(outs, dim=1), full)


def test_kv_cache_decoding_with_left_padding_and_per_row_positions():
    B, T, prefill = 2, 8, 5
    attention = make_attention(2)
    position = make_position("rope")
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    padding = torch.arange(T)[None] >= torch.tensor([[0], [2]])  # row 1 has two pads in front
    positions = (torch.arange(T)[None] - torch.tensor([[0], [2]])).clamp(min=0)  # real tokens start at 0
    full = attention(x, position=position, positions=positions, mask=AttentionMask(padding=padding))

    cache = attention.make_cache(B, T, dtype=torch.float64)
    outs = []
    for start, end in [(0, prefill), *((t, t + 1) for t in range(prefill, T))]:
        step_mask = AttentionMask(padding=padding[:, :end])  # padding covers cached and new keys
        step = positions[:, start:end]
        outs.append(attention(x[:, start:end], position=position, positions=step, mask=step_mask, cache=cache))
    decoded = torch.cat(outs, dim=1)
    real = padding[..., None]
    torch.testing.assert_close(decoded * real, full * real)


@pytest.mark.parametrize("position_name", ["none", "rope", "alibi"])
@pytest.mark.parametrize("mask_name", ["causal", "right_padding"])
def test_future_tokens_never_change_the_past(position_name, mask_name):
    B, T, cut = 2, 8, 4
    attention = make_attention(2)
    position = make_position(position_name)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    changed = x.clone()
    changed[:, cut:] = torch.randn(B, T - cut, DIM, dtype=torch.float64)
    mask = AttentionMask(**MASKS[mask_name](B, T))
    kwargs = {"position": position, "positions": torch.arange(T)[None], "mask": mask}
    a, b = attention(x, **kwargs), attention(changed, **kwargs)
    torch.testing.assert_close(a[:, :cut], b[:, :cut])
    assert not torch.allclose(a[:, cut:], b[:, cut:])


def test_prefix_sees_its_own_future():
    B, T = 2, 6
    attention = make_attention(4)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    changed = x.clone()
    changed[:, 2] += 1.0
    mask = AttentionMask(prefix_lengths=torch.tensor([4, 4]))
    kwargs = {"position": make_position("rope"), "positions": torch.arange(T)[None], "mask": mask}
    a, b = attention(x, **kwargs), attention(changed, **kwargs)
    assert not torch.allclose(a[:, :2], b[:, :2])  # bidirectional inside the prefix


@pytest.mark.parametrize("position_name", ["rope", "alibi"])
def test_cross_attention_ignores_causality_and_position(position_name):
    B, T, S = 2, 4, 7
    attention = make_attention(2)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    context = torch.randn(B, S, DIM, dtype=torch.float64)
    padding = torch.arange(S)[None] < torch.tensor([[S], [5]])
    position = make_position(position_name)
    kwargs = {"position": position, "positions": torch.arange(T)[None], "context": context}
    out = attention(x, mask=AttentionMask(causal=True, padding=padding), **kwargs)
    expected = naive_attention(attention, x, naive_allowed(B, T, S, causal=False, padding=padding), context=context)
    torch.testing.assert_close(out, expected)

    unpadded = attention(x, mask=AttentionMask(causal=True), **kwargs)
    allowed = torch.ones(B, T, S, dtype=torch.bool)
    torch.testing.assert_close(unpadded, naive_attention(attention, x, allowed, context=context))

    # a cross-attention cache holds the context's keys/values after the first call
    cache = attention.make_cache(B, S, dtype=torch.float64)
    steps = []
    for t in range(2):
        step = {"position": position, "positions": torch.tensor([[t]]), "context": context, "cache": cache}
        steps.append(attention(x[:, t : t + 1], mask=AttentionMask(padding=padding), **step))
    torch.testing.assert_close(torch.cat(steps, 1), out[:, :2])
    assert cache.length == S


def test_fully_masked_rows_give_zeros_and_finite_gradients():
    B, T = 2, 5
    attention = make_attention(2).float()
    x = torch.randn(B, T, DIM, requires_grad=True)
    padding = torch.tensor([[True] * 5, [False, False, True, True, True]])
    for position_name in ("none", "alibi"):
        out = attention(
            x,
            position=make_position(position_name),
            positions=torch.arange(T)[None],
            mask=AttentionMask(padding=padding),
        )
        assert torch.isfinite(out).all()
        # rows 0 and 1 of batch 1 are pads that see only pads: zero attention output, and o_proj has no bias
        torch.testing.assert_close(out[1, :2], torch.zeros(2, DIM))
        out.sum().backward()
        assert torch.isfinite(x.grad).all()
        x.grad = None
    everything_padded = AttentionMask(causal=False, padding=torch.zeros(B, T, dtype=torch.bool))
    out = attention(x, position=make_position("none"), positions=torch.arange(T)[None], mask=everything_padded)
    assert torch.equal(out, torch.zeros_like(out))


def test_cheapest_sdpa_call(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((attn_mask, kwargs["is_causal"], k.shape[1]))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    attention = make_attention(2)
    x = torch.randn(1, 4, DIM, dtype=torch.float64)
    rope = make_position("rope")
    cache = attention.make_cache(1, 8, dtype=torch.float64)
    attention(x, position=rope, positions=torch.arange(4)[None], mask=AttentionMask(), cache=cache)
    attention(x[:, :1], position=rope, positions=torch.tensor([[4]]), mask=AttentionMask(), cache=cache)
    attention(x[:, :2], position=rope, positions=torch.tensor([[5, 6]]), mask=AttentionMask(), cache=cache)
    attention(x, position=make_position("alibi"), positions=torch.arange(4)[None], mask=AttentionMask())
    prefill, decode, chunk, alibi = calls
    assert prefill[0] is None and prefill[1] is True  # SDPA's causal fast path
    assert decode[0] is None and decode[1] is False  # one new token sees the whole cache
    assert chunk[0].dtype == torch.bool and chunk[0].shape[-2:] == (2, 7)
    assert alibi[0].is_floating_point() and alibi[0].shape == (1, N_HEADS, 4, 4)


def test_dropout_only_in_training():
    attention = MultiHeadAttention(dim=DIM, n_heads=N_HEADS, n_kv_heads=2, dropout=0.5)
    x = torch.randn(2, 6, DIM)
    kwargs = {"position": make_position("none"), "positions": torch.arange(6)[None], "mask": AttentionMask()}
    attention.eval()
    torch.testing.assert_close(attention(x, **kwargs), attention(x, **kwargs))
    attention.train()
    assert not torch.allclose(attention(x, **kwargs), attention(x, **kwargs))


def test_make_cache_and_reset_parameters():
    attention = MultiHeadAttention(dim=DIM, n_heads=N_HEADS, n_kv_heads=2, qk_norm=True)
    cache = attention.make_cache(3, 10, dtype=torch.bfloat16)
    assert isinstance(cache, KVCache)
    assert cache.k.shape == (3, 2, 10, HEAD_DIM) and cache.k.dtype == torch.bfloat16
    with torch.device("meta"):
        meta = MultiHeadAttention(dim=DIM, n_heads=N_HEADS, n_kv_heads=2, qk_norm=True)
    meta.to_empty(device="cpu")
    for module in meta.modules():  # as Lightning materialises meta modules: each resets its own parameters
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert torch.equal(meta.q_norm.weight, torch.ones(HEAD_DIM))
    assert torch.isfinite(meta.q_proj.weight).all() and meta.q_proj.weight.abs().max() <= 1 / math.sqrt(DIM)
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= {n for n, _ in attention.named_children()}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dim": 30, "n_heads": 4}, "dim=30"),
        ({"dim": 32, "n_heads": 4, "n_kv_heads": 3}, "n_kv_heads=3"),
        ({"dim": 32, "n_heads": 4, "dropout": 1.0}, "dropout=1.0"),
    ],
)
def test_refuses_bad_shapes(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MultiHeadAttention(**kwargs)


def test_it_trains_previous_token_copy():
    torch.manual_seed(0)
    vocab, T = 12, 12
    embed, head = nn.Embedding(vocab, DIM), nn.Linear(DIM, vocab)
    attention = MultiHeadAttention(dim=DIM, n_heads=N_HEADS, n_kv_heads=2, qk_norm=True)
    position = make_position("rope")
    optimizer = torch.optim.Adam([*embed.parameters(), *head.parameters(), *attention.parameters()], lr=1e-2)
    positions = torch.arange(T)[None]
    losses = []
    for _ in range(60):
        x = torch.randint(vocab, (16, T))
        h = attention(embed(x), position=position, positions=positions, mask=AttentionMask())
        loss = F.cross_entropy(head(h)[:, 1:].reshape(-1, vocab), x[:, :-1].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_softmax_scale_replaces_one_over_sqrt_head_dim(n_kv_heads):
    """T5 does not scale the scores: softmax(Q K^T * s) V, against a per-head loop."""
    B, T, s = 2, 6, 1.0
    attention = make_attention(n_kv_heads, softmax_scale=s)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    padding = torch.arange(T)[None] < torch.tensor([[T], [T - 2]])
    out = attention(x, position=make_position("alibi"), positions=torch.arange(T)[None],
                    mask=AttentionMask(causal=True, padding=padding))  # fmt: skip
    q = attention.q_proj(x).view(B, T, N_HEADS, HEAD_DIM).transpose(1, 2)
    k = attention.k_proj(x).view(B, T, n_kv_heads, HEAD_DIM).transpose(1, 2)
    v = attention.v_proj(x).view(B, T, n_kv_heads, HEAD_DIM).transpose(1, 2)
    allowed = naive_allowed(B, T, T, padding=padding)
    distance = (torch.arange(T)[:, None] - torch.arange(T)[None]).abs().double()
    expected = torch.zeros(B, N_HEADS, T, HEAD_DIM, dtype=torch.float64)
    for b in range(B):
        for h in range(N_HEADS):
            kv = h // (N_HEADS // n_kv_heads)
            scores = q[b, h] @ k[b, kv].T * s - naive_slopes(N_HEADS)[h] * distance
            expected[b, h] = torch.softmax(scores.masked_fill(~allowed[b], float("-inf")), -1) @ v[b, kv]
    torch.testing.assert_close(out, attention.o_proj(expected.transpose(1, 2).reshape(B, T, DIM)))
    default = make_attention(n_kv_heads)  # same weights (same seed), default 1/sqrt(8): a different output
    other = default(x, position=make_position("alibi"), positions=torch.arange(T)[None],
                    mask=AttentionMask(causal=True, padding=padding))  # fmt: skip
    assert not torch.allclose(out, other)


def test_refuses_a_non_positive_softmax_scale():
    with pytest.raises(ConfigError, match="softmax_scale=0"):
        MultiHeadAttention(dim=DIM, n_heads=N_HEADS, softmax_scale=0)


# --- head_dim other than dim // n_heads (T5 v1.1 small: dim 512, 6 heads of 64) -------------------------------


def naive_wide_heads(attention, x, allowed, scale):
    """softmax(q_h k_h^T * scale) v_h per head, with each head's rows of the weights sliced out by hand."""
    B, T, _ = x.shape
    H, Hkv, hd = attention.n_heads, attention.n_kv_heads, attention.head_dim
    wq, wk, wv, wo = (getattr(attention, f"{p}_proj").weight for p in "qkvo")
    heads = []
    for h in range(H):
        kv = h // (H // Hkv)
        q = x @ wq[h * hd : (h + 1) * hd].T  # (B, T, hd)
        k = x @ wk[kv * hd : (kv + 1) * hd].T
        v = x @ wv[kv * hd : (kv + 1) * hd].T
        scores = (q @ k.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf"))  # (B, T, T)
        heads.append(torch.softmax(scores, dim=-1) @ v)
    return torch.cat(heads, dim=-1) @ wo.T  # (B, T, H * hd) -> (B, T, dim)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("head_dim", [16, 6], ids=["wider", "narrower"])
@pytest.mark.parametrize("softmax_scale", [None, 1.0])
def test_head_dim_other_than_dim_over_heads_matches_naive(n_kv_heads, head_dim, softmax_scale):
    B, T = 2, 7
    attention = make_attention(n_kv_heads, head_dim=head_dim, softmax_scale=softmax_scale)
    assert attention.q_proj.weight.shape == (N_HEADS * head_dim, DIM)
    assert attention.k_proj.weight.shape == attention.v_proj.weight.shape == (n_kv_heads * head_dim, DIM)
    assert attention.o_proj.weight.shape == (DIM, N_HEADS * head_dim)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    padding = torch.arange(T)[None] < torch.tensor([[T], [T - 2]])
    out = attention(x, position=make_position("none"), positions=torch.arange(T)[None],
                    mask=AttentionMask(causal=True, padding=padding))  # fmt: skip
    scale = 1 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    expected = naive_wide_heads(attention, x, naive_allowed(B, T, T, padding=padding), scale)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("position_name", ["rope", "alibi"])
def test_head_dim_with_a_rotation_of_that_width_or_a_score_bias(position_name):
    B, T, head_dim = 2, 6, 16
    attention = make_attention(2, head_dim=head_dim)
    cls = RoPE if position_name == "rope" else ALiBi
    position = cls(dim=DIM, n_heads=N_HEADS, head_dim=head_dim, max_seq_len=64)  # RoPE built for the heads' width
    attention.check_compatible(position)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    out = attention(x, position=position, positions=torch.arange(T)[None], mask=AttentionMask())
    expected = naive_attention(attention, x, naive_allowed(B, T, T), position=position, alibi=position_name == "alibi")
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("position_name", ["none", "alibi"])
def test_head_dim_cached_decoding_matches_uncached(n_kv_heads, position_name):
    B, T, prefill, head_dim = 2, 9, 4, 16
    attention = make_attention(n_kv_heads, head_dim=head_dim)
    position = make_position(position_name)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    mask = AttentionMask(causal=True)
    full = attention(x, position=position, positions=torch.arange(T)[None], mask=mask)
    cache = attention.make_cache(B, 12, dtype=torch.float64)
    assert cache.k.shape == (B, n_kv_heads, 12, head_dim)
    outs = [attention(x[:, :prefill], position=position, positions=torch.arange(prefill)[None], mask=mask, cache=cache)]
    for t in range(prefill, T):
        outs.append(
            attention(x[:, t : t + 1], position=position, positions=torch.tensor([[t]]), mask=mask, cache=cache)
        )
    assert cache.length == T
    torch.testing.assert_close(torch.cat(outs, dim=1), full)


def test_head_dim_refuses_a_rotation_of_another_width():
    attention = MultiHeadAttention(dim=DIM, n_heads=N_HEADS, head_dim=16)
    with pytest.raises(ConfigError, match=r"head_dim=16.*RoPE.*head_dim=8"):
        attention.check_compatible(make_position("rope"))  # built as the model does: dim // n_heads = 8
    for name in ("none", "alibi"):  # no rotation: the width does not matter
        attention.check_compatible(make_position(name))
    MultiHeadAttention(dim=DIM, n_heads=N_HEADS).check_compatible(make_position("rope"))  # default width: fine

    from functools import partial

    from lightningllm.models.decoder import Decoder
    from lightningllm.registry import get

    with pytest.raises(ConfigError, match="head_dim=16"):  # the model asks at build time
        Decoder(vocab_size=16, dim=DIM, n_layers=1, n_heads=N_HEADS, attention=partial(MultiHeadAttention, head_dim=16),
                ffn=get("ffn", "MLP"), norm=get("norm", "LayerNorm"), position=get("position", "RoPE"),
                block=get("block", "PreNorm"), max_seq_len=32)  # fmt: skip


@pytest.mark.parametrize("head_dim", [0, -4, 2.5, True, "16"])
def test_refuses_a_bad_head_dim(head_dim):
    with pytest.raises(ConfigError, match="head_dim="):
        MultiHeadAttention(dim=DIM, n_heads=N_HEADS, head_dim=head_dim)


def test_sliding_window_banded_path_with_head_dim():
    """The subclass inherits the knob: its chunked band computes with the wider heads too."""
    from lightningllm_plugins.attention.sliding_window import SlidingWindowAttention

    B, T, window, head_dim = 2, 16, 3, 16
    torch.manual_seed(0)
    attention = SlidingWindowAttention(dim=DIM, n_heads=N_HEADS, n_kv_heads=2, window=window, chunk_size=4,
                                       head_dim=head_dim).double()  # fmt: skip
    positions = torch.arange(T)[None]
    assert attention.band_plan(T, T, positions, AttentionMask()) is not None  # the banded path runs
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    out = attention(x, position=make_position("none"), positions=positions, mask=AttentionMask())
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    allowed = ((j <= i) & (i - j < window)).expand(B, T, T)
    torch.testing.assert_close(out, naive_wide_heads(attention, x, allowed, 1 / math.sqrt(head_dim)))


def test_decoder_with_head_dim_trains():
    from functools import partial

    from lightningllm.models.decoder import Decoder
    from lightningllm.registry import get

    torch.manual_seed(0)
    attention = partial(MultiHeadAttention, head_dim=16)
    model = Decoder(vocab_size=16, dim=DIM, n_layers=2, n_heads=N_HEADS, attention=attention,
                    ffn=get("ffn", "MLP"), norm=get("norm", "RMSNorm"), position=get("position", "ALiBi"),
                    block=get("block", "PreNorm"), max_seq_len=32)  # fmt: skip
    assert model.blocks[0].attention.q_proj.weight.shape == (N_HEADS * 16, DIM)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.arange(16).repeat(2, 2)[:, :24]  # a fixed cycle: perfectly predictable
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
