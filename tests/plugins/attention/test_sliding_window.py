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


def naive_rms(x, weight, eps=1e-6):
    """RMSNorm over the last dimension written out: x / sqrt(mean(x^2) + eps) * weight."""
    return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def naive_attention(attention, x, allowed, *, position, alibi=False):
    """softmax(Q K^T / sqrt(hd) - ALiBi, masked) V with explicit per-head loops; all-masked rows give 0.

    With QK-norm the queries and keys are RMS-normalised by hand (with the module's scales) before rotation.
    """
    B, T, _ = x.shape
    H, Hkv, hd = attention.n_heads, attention.n_kv_heads, attention.head_dim
    q = attention.q_proj(x).view(B, T, H, hd).transpose(1, 2)
    k = attention.k_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
    v = attention.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
    if attention.q_norm is not None:
        q, k = naive_rms(q, attention.q_norm.weight), naive_rms(k, attention.k_norm.weight)
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


@pytest.mark.parametrize("knobs", [{"window": 3}, {"window": 2, "global_tokens": 2}, {"block_size": 3}])
@pytest.mark.parametrize("chunk_size", [None, 4], ids=["full_mask", "banded"])
def test_qk_norm_matches_naive_mask_normalised_by_hand(knobs, chunk_size):
    B, T = 2, 13
    attention = make_attention(2, qk_norm=True, chunk_size=chunk_size, **knobs)
    with torch.no_grad():  # scales away from one, so a wrong or missing scale shows
        attention.q_norm.weight.uniform_(0.5, 2.0)
        attention.k_norm.weight.uniform_(0.5, 2.0)
    position = make_position("rope")
    x = torch.randn(B, T, DIM, dtype=torch.float64) * 3
    allowed = naive_pattern(T, window=knobs.get("window"), global_tokens=knobs.get("global_tokens", 0),
                            block_size=knobs.get("block_size"))  # fmt: skip
    out = run(attention, x, position)
    torch.testing.assert_close(out, naive_attention(attention, x, allowed, position=position))
    assert (attention.band_plan(T, T, torch.arange(T)[None], AttentionMask()) is None) == (chunk_size is None)
    without = make_attention(2, chunk_size=chunk_size, **knobs)  # same projections, no QK-norm
    assert not torch.allclose(run(without, x, position), out)


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


BAND_PATTERNS = {
    "window": {"window": 4},
    "window_global": {"window": 3, "global_tokens": 3},
    "block": {"block_size": 3},
    "block_global": {"block_size": 2, "global_tokens": 1},
}
BAND_MASKS = {
    "causal": lambda T: {},
    "left_padding": lambda T: {"padding": torch.arange(T)[None] >= torch.tensor([[0], [5]])},
    "prefix": lambda T: {"prefix_lengths": torch.tensor([3, 9])},
    "bidirectional": lambda T: {"causal": False, "padding": torch.arange(T)[None] < torch.tensor([[T], [T - 4]])},
    "model_window": lambda T: {
        "window": 2,
        "document_ids": (torch.arange(T)[None] >= torch.tensor([[8], [13]])).long(),
    },
}


def full_mask_twin(attention):
    """The same module, forced onto the full-mask path: one chunk always reaches every key."""
    twin = SlidingWindowAttention(dim=DIM, n_heads=attention.n_heads, n_kv_heads=attention.n_kv_heads,
                                  window=attention.window, global_tokens=attention.global_tokens,
                                  block_size=attention.block_size, chunk_size=10**9).double()  # fmt: skip
    twin.load_state_dict(attention.state_dict())
    return twin


def forward_backward(attention, x, position, positions, mask):
    x = x.detach().requires_grad_()
    out = attention(x, position=position, positions=positions, mask=mask)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    grads = {"x": x.grad, **{n: p.grad for n, p in attention.named_parameters()}}
    attention.zero_grad()
    return out, grads


@pytest.mark.parametrize("pattern", list(BAND_PATTERNS))
@pytest.mark.parametrize("mask_name", list(BAND_MASKS))
@pytest.mark.parametrize("position_name", ["rope", "alibi"])
def test_banded_path_equals_the_full_mask_with_gradients(pattern, mask_name, position_name):
    B, T = 2, 23  # chunks of 5: the last one is shorter
    n_kv_heads = {"window": 4, "window_global": 2, "block": 1, "block_global": 2}[pattern]
    attention = make_attention(n_kv_heads, chunk_size=5, **BAND_PATTERNS[pattern])
    position, positions = make_position(position_name), torch.arange(T)[None]
    mask = AttentionMask(**BAND_MASKS[mask_name](T))
    plan = attention.band_plan(T, T, positions, mask)
    assert plan is not None and len(plan) >= 4
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    out, grads = forward_backward(attention, x, position, positions, mask)
    expected, expected_grads = forward_backward(full_mask_twin(attention), x, position, positions, mask)
    torch.testing.assert_close(out, expected)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


def test_banded_path_matches_in_float32_to_1e_5():
    B, T = 2, 200
    attention = make_attention(2, window=16, global_tokens=2, chunk_size=24).float()
    twin = full_mask_twin(attention).float()
    x = torch.randn(B, T, DIM)
    mask = AttentionMask(padding=torch.arange(T)[None] >= torch.tensor([[0], [7]]))
    position = make_position("rope")
    out = attention(x, position=position, positions=torch.arange(T)[None], mask=mask)
    expected = twin(x, position=position, positions=torch.arange(T)[None], mask=mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("knobs", [{"window": 3}, {"window": 2, "global_tokens": 3}, {"block_size": 2}])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_packed_documents_take_the_banded_path_unless_global_tokens_need_the_full_mask(knobs, causal):
    B, T = 2, 21
    attention = make_attention(2, chunk_size=4, **knobs)
    starts = torch.tensor([[6], [11]])
    index = torch.arange(T)[None]
    positions = torch.where(index >= starts, index - starts, index)  # positions restart with document 1
    mask = AttentionMask(causal=causal, document_ids=(index >= starts).long())
    plan = attention.band_plan(T, T, positions, mask)
    assert (plan is None) == bool(knobs.get("global_tokens"))  # packed global tokens sit anywhere: full mask
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    position = make_position("alibi")
    out = attention(x, position=position, positions=positions, mask=mask)
    torch.testing.assert_close(out, full_mask_twin(attention)(x, position=position, positions=positions, mask=mask))
    # positions that restart where the documents do not change: the band would miss allowed pairs
    one_document = torch.zeros(B, T, dtype=torch.long)
    returning = (index >= starts).long() * (index < starts + 5)  # document 0 comes back after document 1
    for other in (AttentionMask(causal=causal), AttentionMask(causal=causal, document_ids=one_document),
                  AttentionMask(causal=causal, document_ids=returning)):  # fmt: skip
        assert attention.band_plan(T, T, positions, other) is None
        torch.testing.assert_close(
            attention(x, position=position, positions=positions, mask=other),
            full_mask_twin(attention)(x, position=position, positions=positions, mask=other),
        )


@pytest.mark.parametrize("knobs", [{"window": 4}, {"window": 3, "global_tokens": 2}, {"block_size": 3}])
@pytest.mark.parametrize("position_name", ["rope", "alibi"])
def test_banded_prefill_and_decoding_with_the_cache_equal_the_full_mask(knobs, position_name):
    B, T, prefill = 2, 23, 9
    attention = make_attention(1, n_heads=2, chunk_size=3, **knobs)  # grouped: both query heads read one head
    position = make_position(position_name, n_heads=2)
    padding = torch.arange(T)[None] >= torch.tensor([[0], [2]])  # left padding, given over every key so far
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    expected = full_mask_twin(attention)(x, position=position, positions=torch.arange(T)[None],
                                         mask=AttentionMask(padding=padding))  # fmt: skip
    cache = attention.make_cache(B, 32, dtype=torch.float64)
    steps = [(0, prefill), *((t, t + 1) for t in range(prefill, 15)), (15, 19), (19, T)]
    outs, plans = [], []
    for a, b in steps:
        positions, mask = torch.arange(a, b)[None], AttentionMask(padding=padding[:, :b])
        plans.append(attention.band_plan(b - a, b, positions, mask))
        outs.append(attention(x[:, a:b], position=position, positions=positions, mask=mask, cache=cache))
    assert cache.length == T
    assert all(plan is not None for plan in plans[1:])  # every decoding step reads a band of the cache only
    reach = attention.reach
    last_step = plans[-2]  # one token at position 18 of 19 keys
    assert last_step[-1][2][-1] == (18 - reach, 19)
    torch.testing.assert_close(torch.cat(outs, dim=1), expected)


def sdpa_mask_sizes(monkeypatch):
    """Record the number of elements of every attention mask handed to SDPA."""
    sizes, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        sizes.append(q.shape[-2] * k.shape[-2] if attn_mask is None else attn_mask.shape[-2] * attn_mask.shape[-1])
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return sizes


def saved_bytes(attention, x, position, mask):
    """Bytes of the distinct storages autograd keeps for the backward pass of one forward."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        attention(x, position=position, positions=torch.arange(x.shape[1])[None], mask=mask)
    return sum(storages.values())


@pytest.mark.parametrize("knobs", [{"window": 8}, {"window": 8, "global_tokens": 4}, {"block_size": 4}])
def test_banded_memory_is_linear_in_length(monkeypatch, knobs):
    attention = make_attention(2, chunk_size=16, **knobs).float()
    twin = full_mask_twin(attention).float()
    position, mask = make_position("alibi"), AttentionMask(padding=torch.ones(1, 1024, dtype=torch.bool))
    sizes = sdpa_mask_sizes(monkeypatch)
    largest, saved, full_saved = {}, {}, {}
    for T in (256, 512, 1024):
        x = torch.randn(1, T, DIM, requires_grad=True)
        sizes.clear()
        padded = AttentionMask(padding=mask.padding[:, :T])
        saved[T], largest[T] = saved_bytes(attention, x, position, padded), max(sizes)
        full_saved[T] = saved_bytes(twin, x, position, padded)
    # the largest mask: chunk x (chunk + reach + global keys) for band chunks, global queries x T for theirs
    band = 16 * (16 + attention.reach + attention.global_tokens)
    assert largest[256] <= max(band, attention.global_tokens * 256)
    assert largest[1024] <= max(band, attention.global_tokens * 1024)
    assert saved[1024] < 2.3 * saved[512] < 2.3**2 * saved[256]  # doubling T at most ~doubles autograd's memory
    assert full_saved[1024] > 3.5 * full_saved[512]  # ... where the full mask's grows ~4x (the test can tell)
    assert saved[1024] < full_saved[1024] / 8


def test_banded_path_is_chosen_on_cpu_by_default_for_long_sequences(monkeypatch):
    sizes = sdpa_mask_sizes(monkeypatch)
    attention = make_attention(2, window=5)  # default chunk: max(64, reach + 1) = 64
    plan = attention.band_plan(200, 200, torch.arange(200)[None], AttentionMask())
    assert [(a, b) for a, b, _ in plan] == [(0, 64), (64, 128), (128, 192), (192, 200)]
    assert [r for _, _, r in plan] == [((0, 64),), ((60, 128),), ((124, 192),), ((188, 200),)]
    run(attention, torch.randn(1, 200, DIM, dtype=torch.float64), make_position("rope"))
    assert sizes == [64 * 64, 64 * 68, 64 * 68, 8 * 12]
    sizes.clear()
    run(attention, torch.randn(1, 66, DIM, dtype=torch.float64), make_position("rope"))  # 64 + 4 >= 66: one call
    assert sizes == [66 * 66]


def test_two_layers_with_different_windows_compose_their_reach():
    window = partial(SlidingWindowAttention, chunk_size=3)
    overrides = [LayerOverride(layers=[0], attention=partial(window, window=2)),
                 LayerOverride(layers=[1], attention=partial(window, window=4))]  # fmt: skip
    torch.manual_seed(0)
    model = Decoder(vocab_size=20, dim=DIM, n_layers=2, n_heads=N_HEADS,
                    attention=get("attention", "MultiHeadAttention"), ffn=get("ffn", "MLP"),
                    norm=get("norm", "RMSNorm"), position=get("position", "RoPE"), block=get("block", "PreNorm"),
                    max_seq_len=32, overrides=overrides).eval()  # fmt: skip
    assert [b.attention.window for b in model.blocks] == [2, 4]
    ids = torch.randint(0, 20, (2, 16))
    t = 5
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 1) % 20
    with torch.no_grad():
        a, b = model(ids), model(changed)
    reach = 1 + 3  # layer 0 carries token t to t + 1, layer 1 carries that on to t + 1 + 3
    torch.testing.assert_close(a[:, t + reach + 1 :], b[:, t + reach + 1 :])
    assert not torch.allclose(a[:, t + reach], b[:, t + reach])
    torch.testing.assert_close(a[:, :t], b[:, :t])


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
        ({"chunk_size": 0}, "chunk_size=0"),
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
