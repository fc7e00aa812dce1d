import math

import pytest
import torch
import torch.nn.functional as F

from lightningllm.errors import ConfigError
from lightningllm.generation import generate
from lightningllm.mask import AttentionMask
from lightningllm_plugins.attention.linear import LinearAttention, LinearAttentionState
from lightningllm_plugins.position.alibi import ALiBi
from lightningllm_plugins.position.no_position import NoPosition
from lightningllm_plugins.position.rope import RoPE

DIM, N_HEADS, HEAD_DIM, EPS = 32, 4, 8, 1e-6
FEATURE_MAPS = ["elu", "relu", "exp", "exp_head_dim"]


def make_position(name):
    cls = {"none": NoPosition, "rope": RoPE, "alibi": ALiBi}[name]
    return cls(dim=DIM, n_heads=N_HEADS, head_dim=HEAD_DIM, max_seq_len=64)


def make_attention(n_kv_heads=N_HEADS, seed=0, **knobs):
    torch.manual_seed(seed)
    return LinearAttention(dim=DIM, n_heads=N_HEADS, n_kv_heads=n_kv_heads, **knobs).double()


def naive_phi(name, x):
    """The feature maps written out from their definitions."""
    if name == "elu":
        return torch.where(x > 0, x + 1.0, torch.exp(x))  # elu(x) + 1
    if name == "relu":
        return x.clamp(min=0.0)
    if name == "exp_head_dim":
        return torch.exp(x / HEAD_DIM)  # the seed notes' exp(x / d_head)
    return torch.exp(x) / torch.exp(x.max(dim=-1, keepdim=True).values)


def test_exp_head_dim_weights_are_the_seed_formula_and_differ_from_the_shifted_exp():
    # One head, no projections in the way: the attention weight of key s for query t is
    # sum_i exp(q_i / d) exp(k_i / d), normalised over s; the per-key max shift of "exp" changes it.
    attention = make_attention(feature_map="exp_head_dim")
    q, k = torch.randn(1, 1, 3, HEAD_DIM, dtype=torch.float64), torch.randn(1, 1, 3, HEAD_DIM, dtype=torch.float64)
    d = HEAD_DIM
    scores = torch.tensor(
        [[sum(math.exp(q[0, 0, t, i] / d) * math.exp(k[0, 0, s, i] / d) for i in range(d)) for s in range(3)]
         for t in range(3)], dtype=torch.float64,
    )  # fmt: skip
    phi_q, phi_k = attention._phi(q), attention._phi(k)
    torch.testing.assert_close((phi_q @ phi_k.transpose(-1, -2))[0, 0], scores)
    shifted = make_attention(feature_map="exp")
    weights = scores / scores.sum(-1, keepdim=True)
    other = shifted._phi(q) @ shifted._phi(k).transpose(-1, -2)
    assert not torch.allclose(weights, (other / other.sum(-1, keepdim=True))[0, 0], atol=1e-3)


def naive_rms(x, weight):
    """RMSNorm over the last dimension written out: x / sqrt(mean(x^2) + eps) * weight."""
    return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + EPS) * weight


def naive_linear_attention(attention, x, *, causal, padding=None, position=None, context=None):
    """phi(Q) phi(K)^T with an explicit (T, S) mask, row-normalised, times V; one head at a time.

    With QK-norm the queries and keys are RMS-normalised by hand (with the module's scales) first.
    """
    B, T, _ = x.shape
    src = x if context is None else context
    S = src.shape[1]
    H, Hkv, hd = attention.n_heads, attention.n_kv_heads, attention.head_dim
    q = attention.q_proj(x).view(B, T, H, hd).transpose(1, 2)
    k = attention.k_proj(src).view(B, S, Hkv, hd).transpose(1, 2)
    v = attention.v_proj(src).view(B, S, Hkv, hd).transpose(1, 2)
    if attention.q_norm is not None:
        q, k = naive_rms(q, attention.q_norm.weight), naive_rms(k, attention.k_norm.weight)
    if position is not None:
        q, _ = position.rotate(q, q, torch.arange(T)[None])
        k, _ = position.rotate(k, k, torch.arange(S)[None])
    fq, fk = naive_phi(attention.feature_map, q), naive_phi(attention.feature_map, k)
    out = torch.zeros(B, H, T, hd, dtype=x.dtype)
    for b in range(B):
        allowed = torch.ones(T, S, dtype=x.dtype)
        if causal:
            allowed = allowed * torch.tril(torch.ones(T, S, dtype=x.dtype))
        if padding is not None:
            allowed = allowed * padding[b][None].to(x.dtype)
        for h in range(H):
            kv = h // (H // Hkv)
            scores = (fq[b, h] @ fk[b, kv].T) * allowed  # (T, S)
            out[b, h] = scores @ v[b, kv] / (scores.sum(-1, keepdim=True) + EPS)
    return attention.o_proj(out.transpose(1, 2).reshape(B, T, H * hd))


def call(attention, x, position="none", positions=None, **mask_and_cache):
    cache = mask_and_cache.pop("cache", None)
    context = mask_and_cache.pop("context", None)
    T = x.shape[1]
    positions = torch.arange(T)[None] if positions is None else positions
    pos = position if not isinstance(position, str) else make_position(position)
    return attention(
        x, position=pos, positions=positions, mask=AttentionMask(**mask_and_cache), cache=cache, context=context
    )


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 64])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_causal_chunks_equal_the_quadratic_form(feature_map, chunk_size, n_kv_heads):
    B, T = 2, 10  # chunk sizes 3 and 4 do not divide T; 64 is larger than T
    attention = make_attention(n_kv_heads, feature_map=feature_map, chunk_size=chunk_size)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    padding = torch.arange(T)[None] >= torch.tensor([[0], [3]])  # left padding in row 1
    out = call(attention, x, causal=True, padding=padding)
    torch.testing.assert_close(out, naive_linear_attention(attention, x, causal=True, padding=padding))
    plain = call(attention, x, causal=True)
    torch.testing.assert_close(plain, naive_linear_attention(attention, x, causal=True))


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_bidirectional_equals_the_quadratic_form_with_padding(feature_map):
    B, T = 2, 7
    attention = make_attention(2, feature_map=feature_map, bias=True)
    for proj in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
        torch.nn.init.normal_(proj.bias)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    padding = torch.arange(T)[None] < torch.tensor([[T], [4]])
    out = call(attention, x, "rope", causal=False, padding=padding)
    expected = naive_linear_attention(attention, x, causal=False, padding=padding, position=make_position("rope"))
    torch.testing.assert_close(out, expected)
    # padded keys are ignored: changing them changes no output of row 1
    changed = x.clone()
    changed[1, 4:] = torch.randn(T - 4, DIM, dtype=torch.float64)
    torch.testing.assert_close(call(attention, changed, "rope", causal=False, padding=padding)[1, :4], out[1, :4])


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_cross_attention_reads_the_context_and_caches_its_sums(feature_map):
    B, T, S = 2, 4, 6
    attention = make_attention(2, feature_map=feature_map)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    context = torch.randn(B, S, DIM, dtype=torch.float64)
    padding = torch.arange(S)[None] < torch.tensor([[S], [3]])
    out = call(attention, x, "rope", padding=padding, context=context)
    expected = naive_linear_attention(attention, x, causal=False, padding=padding, context=context)
    torch.testing.assert_close(out, expected)
    cache = attention.make_cache(B, S, dtype=torch.float64)
    steps = [call(attention, x[:, t : t + 1], padding=padding, context=context, cache=cache) for t in range(T)]
    assert cache.length == S
    torch.testing.assert_close(torch.cat(steps, dim=1), out)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("position_name", ["none", "rope"])
def test_decoding_with_the_state_equals_the_full_forward(feature_map, position_name):
    B, T, prefill = 2, 13, 5
    attention = make_attention(2, feature_map=feature_map, chunk_size=2)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    full = call(attention, x, position_name)
    cache = attention.make_cache(B, 32, dtype=torch.float64)
    assert isinstance(cache, LinearAttentionState)
    steps = [(0, prefill), *((t, t + 1) for t in range(prefill, 9)), (9, 12), (12, 13)]  # 1-token and 3-token steps
    outs = [call(attention, x[:, a:b], position_name, torch.arange(a, b)[None], cache=cache) for a, b in steps]
    assert cache.length == T
    torch.testing.assert_close(torch.cat(outs, dim=1), full)
    cache.reset()
    assert cache.length == 0 and not cache.S.any() and not cache.z.any()
    torch.testing.assert_close(call(attention, x, position_name, cache=cache), full)


def test_decoding_with_left_padding():
    B, T, prefill = 2, 8, 5
    attention = make_attention(2)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    padding = torch.arange(T)[None] >= torch.tensor([[0], [2]])
    full = call(attention, x, padding=padding)
    cache = attention.make_cache(B, T, dtype=torch.float64)
    outs = []
    for a, b in [(0, prefill), *((t, t + 1) for t in range(prefill, T))]:
        outs.append(call(attention, x[:, a:b], positions=torch.arange(a, b)[None], padding=padding[:, :b], cache=cache))
    torch.testing.assert_close(torch.cat(outs, dim=1), full)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("position_name", ["none", "rope"])
def test_future_tokens_never_change_the_past(feature_map, position_name):
    B, T, cut = 2, 11, 6
    attention = make_attention(2, feature_map=feature_map, chunk_size=4)  # the cut falls inside a chunk
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    changed = x.clone()
    changed[:, cut:] = torch.randn(B, T - cut, DIM, dtype=torch.float64)
    a, b = call(attention, x, position_name), call(attention, changed, position_name)
    torch.testing.assert_close(a[:, :cut], b[:, :cut])
    assert not torch.allclose(a[:, cut:], b[:, cut:])


def make_qk_norm_attention(n_kv_heads=2, **knobs):
    """QK-norm with scales away from one, so a wrong or missing scale shows."""
    attention = make_attention(n_kv_heads, qk_norm=True, **knobs)
    with torch.no_grad():
        attention.q_norm.weight.uniform_(0.5, 2.0)
        attention.k_norm.weight.uniform_(0.5, 2.0)
    return attention


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("chunk_size", [3, 64])
@pytest.mark.parametrize("n_kv_heads", [4, 1], ids=["mha", "mqa"])
def test_qk_norm_causal_chunks_equal_the_quadratic_form_normalised_by_hand(feature_map, chunk_size, n_kv_heads):
    B, T = 2, 10
    attention = make_qk_norm_attention(n_kv_heads, feature_map=feature_map, chunk_size=chunk_size)
    x = torch.randn(B, T, DIM, dtype=torch.float64) * 3
    padding = torch.arange(T)[None] >= torch.tensor([[0], [3]])
    rope = make_position("rope")
    out = call(attention, x, rope, causal=True, padding=padding)
    expected = naive_linear_attention(attention, x, causal=True, padding=padding, position=rope)
    torch.testing.assert_close(out, expected)
    plain = make_attention(n_kv_heads, feature_map=feature_map, chunk_size=chunk_size)  # same projections, no norm
    assert not torch.allclose(call(plain, x, rope, causal=True, padding=padding), out)
    quadratic = make_qk_norm_attention(n_kv_heads, feature_map=feature_map, chunk_size=T)  # one chunk: all quadratic
    torch.testing.assert_close(call(quadratic, x, rope, causal=True, padding=padding), out)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_qk_norm_bidirectional_and_cross_attention_match_by_hand(feature_map):
    B, T, S = 2, 5, 7
    attention = make_qk_norm_attention(2, feature_map=feature_map)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    context = torch.randn(B, S, DIM, dtype=torch.float64)
    padding = torch.arange(S)[None] < torch.tensor([[S], [4]])
    out = call(attention, x, padding=padding, context=context)
    torch.testing.assert_close(
        out, naive_linear_attention(attention, x, causal=False, padding=padding, context=context)
    )
    out = call(attention, x, "rope", causal=False)
    expected = naive_linear_attention(attention, x, causal=False, position=make_position("rope"))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_qk_norm_decoding_with_the_state_equals_the_full_forward(feature_map):
    B, T, prefill = 2, 11, 4
    attention = make_qk_norm_attention(2, feature_map=feature_map, chunk_size=3)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    full = call(attention, x, "rope")
    cache = attention.make_cache(B, T, dtype=torch.float64)
    steps = [(0, prefill), *((t, t + 1) for t in range(prefill, 8)), (8, T)]
    outs = [call(attention, x[:, a:b], "rope", torch.arange(a, b)[None], cache=cache) for a, b in steps]
    torch.testing.assert_close(torch.cat(outs, dim=1), full)


def test_qk_norm_reset_parameters_on_meta_and_scales_get_gradients():
    with torch.device("meta"):
        meta = LinearAttention(dim=DIM, n_heads=N_HEADS, n_kv_heads=2, qk_norm=True)
    meta.to_empty(device="cpu")
    for module in meta.modules():  # as Lightning materialises meta modules: each resets its own parameters
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert torch.equal(meta.q_norm.weight, torch.ones(HEAD_DIM)) and torch.equal(
        meta.k_norm.weight, torch.ones(HEAD_DIM)
    )
    assert make_attention(2).q_norm is None and "q_norm.weight" not in make_attention(2).state_dict()
    attention = make_qk_norm_attention(2)
    call(attention, torch.randn(2, 6, DIM, dtype=torch.float64), "rope").square().sum().backward()
    assert attention.q_norm.weight.grad.abs().sum() > 0 and attention.k_norm.weight.grad.abs().sum() > 0


def test_rope_changes_the_output_and_alibi_is_refused(decoder_factory):
    attention = make_attention(2)
    x = torch.randn(1, 6, DIM, dtype=torch.float64)
    assert not torch.allclose(call(attention, x, "rope"), call(attention, x, "none"))
    with pytest.raises(ConfigError, match="ALiBi.*bias"):
        call(attention, x, "alibi")
    with pytest.raises(ConfigError, match="ALiBi.*bias"):
        attention.check_compatible(make_position("alibi"))
    for name in ("none", "rope"):
        attention.check_compatible(make_position(name))
    with pytest.raises(ConfigError, match="ALiBi"):  # the model refuses the pairing when it is built
        decoder_factory(attention="LinearAttention", position="ALiBi")
    decoder_factory(attention="LinearAttention", position="RoPE")


@pytest.mark.parametrize(
    "field, value",
    [("window", 3), ("document_ids", torch.zeros(1, 6, dtype=torch.long)), ("prefix_lengths", torch.tensor([2]))],
)
def test_unsupported_mask_fields_are_refused_by_name(field, value):
    attention = make_attention(2)
    with pytest.raises(ConfigError, match=field):
        call(attention, torch.randn(1, 6, DIM, dtype=torch.float64), **{field: value})


@pytest.mark.parametrize(
    "knobs, match",
    [
        ({"dim": 30}, "dim=30"),
        ({"n_kv_heads": 3}, "n_kv_heads=3"),
        ({"feature_map": "softmax"}, "feature_map='softmax'"),
        ({"chunk_size": 0}, "chunk_size=0"),
        ({"eps": 0.0}, "eps=0.0"),
        ({"dropout": 1.0}, "dropout=1.0"),
    ],
)
def test_bad_knobs_are_refused(knobs, match):
    kwargs = {"dim": DIM, "n_heads": N_HEADS, **knobs}
    with pytest.raises(ConfigError, match=match):
        LinearAttention(**kwargs)


def test_exp_feature_map_is_safe_where_a_plain_exp_overflows():
    attention = make_attention(2, feature_map="exp").float()
    x = torch.randn(2, 9, DIM) * 100
    q = attention.q_proj(x)
    assert torch.isinf(torch.exp(q)).any()  # scores this large overflow float32 unshifted
    out = call(attention, x)
    assert torch.isfinite(out).all()
    expected = naive_linear_attention(attention.double(), x.double(), causal=True)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_low_precision_input_keeps_its_dtype_and_a_float32_state():
    attention = make_attention(2).to(torch.bfloat16)
    x = torch.randn(2, 9, DIM, dtype=torch.bfloat16)
    cache = attention.make_cache(2, 16, dtype=torch.bfloat16)
    assert cache.S.dtype == torch.float32 and cache.S.shape == (2, 2, HEAD_DIM, HEAD_DIM)
    out = call(attention, x, cache=cache)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    expected = naive_linear_attention(attention.double(), x.double(), causal=True)
    torch.testing.assert_close(out.double(), expected, atol=0.02, rtol=0.02)


def test_gradients_are_finite_with_fully_padded_rows():
    attention = make_attention(2, feature_map="relu").float()
    x = torch.randn(2, 5, DIM, requires_grad=True)
    padding = torch.tensor([[True] * 5, [False] * 5])
    out = call(attention, x, padding=padding)
    torch.testing.assert_close(out[1], torch.zeros(5, DIM))  # no key: output 0 (o_proj has no bias)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_a_decoder_trains_and_greedy_generation_matches_recomputation(decoder_factory):
    torch.manual_seed(0)
    model = decoder_factory(attention="LinearAttention", position="LearnedPosition", n_kv_heads=2, vocab_size=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.arange(16).repeat(2, 2)[:, :24]  # a fixed cycle: perfectly predictable
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]

    model.eval()
    prompt = torch.randint(0, 16, (2, 5))
    expected = prompt
    with torch.no_grad():
        for _ in range(10):  # no cache: recompute everything for each new token
            expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generate(model, prompt, 10, temperature=0), expected)
