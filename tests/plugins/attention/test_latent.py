import math
from functools import partial

import pytest
import torch
from torch import nn

from lightningllm.cache import KVCache
from lightningllm.contracts import Position
from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask
from lightningllm_plugins.attention.latent import LatentCache, MultiHeadLatentAttention
from lightningllm_plugins.attention.multi_head import MultiHeadAttention
from lightningllm_plugins.position.alibi import ALiBi
from lightningllm_plugins.position.learned import LearnedPosition
from lightningllm_plugins.position.no_position import NoPosition
from lightningllm_plugins.position.rope import RoPE

DIM, N_HEADS = 32, 4
KNOBS = {"kv_lora_rank": 10, "q_lora_rank": 12, "rope_head_dim": 4, "nope_head_dim": 6, "v_head_dim": 5}


def make_mla(seed=0, n_kv_heads=None, **knobs):
    torch.manual_seed(seed)
    attention = MultiHeadLatentAttention(dim=DIM, n_heads=N_HEADS, n_kv_heads=n_kv_heads, dropout=0.0, **knobs)
    for norm in (attention.q_latent_norm, attention.kv_latent_norm):
        if norm is not None:  # non-trivial norm scales
            nn.init.uniform_(norm.weight, 0.5, 1.5)
    return attention.double()


def make_position(name, **knobs):
    cls = {"none": NoPosition, "rope": RoPE, "alibi": ALiBi, "learned": LearnedPosition}[name]
    return cls(dim=DIM, n_heads=N_HEADS, head_dim=DIM // N_HEADS, max_seq_len=64, **knobs)


# ---------------------------------------------------------------- naive reference, from the paper's equations


def rms(v, weight):
    return v if weight is None else v / torch.sqrt(v.pow(2).mean() + 1e-6) * weight


def rotate(vec, pos, base):
    """RoPE of one vector at position ``pos``: channel i pairs with i + d/2 (rotate-half), explicit loop."""
    d = vec.shape[0]
    out = vec.clone()
    for i in range(d // 2):
        theta = pos * base ** (-2 * i / d)
        a, b = vec[i], vec[i + d // 2]
        out[i] = a * math.cos(theta) - b * math.sin(theta)
        out[i + d // 2] = a * math.sin(theta) + b * math.cos(theta)
    return out


def naive_mla(att, x, allowed, pos, *, base=10000.0, scale=1.0, slopes=None):
    """Eqs. 9-19 of DeepSeek-V2 token by token and head by head; a query that sees no key gives 0.

    pos: (B, T) nested list of positions (rotated by pos * scale; ALiBi uses them as they are);
    allowed: (B, T, T) bool; slopes: per-head ALiBi slopes or None.
    """
    B, T, _ = x.shape
    H, nope, rope, vd, r = att.n_heads, att.nope_head_dim, att.rope_head_dim, att.v_head_dim, att.kv_lora_rank
    G = H // att.n_kv_heads  # query head h reads up-projected key/value head h // G
    w_uk = att.k_up_proj.weight.view(att.n_kv_heads, nope, r)
    w_uv = att.v_up_proj.weight.view(att.n_kv_heads, vd, r)
    q_norm = att.q_latent_norm.weight if att.q_latent_norm is not None else None
    kv_norm = att.kv_latent_norm.weight if att.kv_latent_norm is not None else None
    out = torch.zeros(B, T, H * vd, dtype=x.dtype)
    for b in range(B):
        c_kv = [rms(att.kv_down_proj.weight @ x[b, s], kv_norm) for s in range(T)]
        k_rope = [
            rotate(att.k_rope_proj.weight @ x[b, s], pos[b][s] * scale, base) if rope else x.new_zeros(0)
            for s in range(T)
        ]
        for t in range(T):
            c_q = x[b, t] if att.q_down_proj is None else rms(att.q_down_proj.weight @ x[b, t], q_norm)
            q = (att.q_proj.weight @ c_q).view(H, nope + rope)
            for h in range(H):
                q_nope = q[h, :nope]
                q_rope = rotate(q[h, nope:], pos[b][t] * scale, base) if rope else q[h, nope:]
                scores = torch.full((T,), float("-inf"), dtype=x.dtype)
                for s in range(T):
                    if allowed[b, t, s]:
                        score = q_nope @ (w_uk[h // G] @ c_kv[s]) + q_rope @ k_rope[s]
                        scores[s] = score / math.sqrt(nope + rope)
                        if slopes is not None:
                            scores[s] -= slopes[h] * abs(pos[b][t] - pos[b][s])
                if allowed[b, t].any():
                    probs = torch.softmax(scores, dim=0)
                    out[b, t, h * vd : (h + 1) * vd] = sum(probs[s] * (w_uv[h // G] @ c_kv[s]) for s in range(T))
    return att.o_proj(out)


def naive_allowed(B, T, *, causal=True, padding=None, prefix_lengths=None, window=None, document_ids=None):
    allowed = torch.ones(B, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                ok = True
                if causal:
                    ok = j <= i or (prefix_lengths is not None and i < prefix_lengths[b] and j < prefix_lengths[b])
                if window is not None:
                    ok = ok and i - j < window
                if document_ids is not None:
                    ok = ok and bool(document_ids[b, i] == document_ids[b, j])
                if padding is not None:
                    ok = ok and bool(padding[b, j])
                allowed[b, i, j] = ok
    return allowed


B, T = 2, 7
MASKS = {
    "causal": {},
    "bidirectional": {"causal": False},
    "left_padding": {"padding": torch.arange(T)[None] >= torch.tensor([[0], [3]])},
    "right_padding_bidirectional": {"causal": False, "padding": torch.arange(T)[None] < torch.tensor([[T], [4]])},
    "prefix": {"prefix_lengths": torch.tensor([3, 5])},
    "window": {"window": 3},
    "documents": {"document_ids": torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 2, 2]])},
}


@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mla", "grouped"])
@pytest.mark.parametrize("absorb", ["never", "always"])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_matches_naive_mla_under_every_mask(mask_name, absorb, n_kv_heads):
    attention = make_mla(absorb=absorb, n_kv_heads=n_kv_heads, **KNOBS)
    position = make_position("rope", base=500.0)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    fields = MASKS[mask_name]
    positions = torch.arange(T)[None].expand(B, T)
    if mask_name == "documents":  # packed documents restart their positions
        ids = fields["document_ids"]
        positions = torch.stack([torch.tensor([(ids[b, :t] == ids[b, t]).sum() for t in range(T)]) for b in range(B)])
    out = attention(x, position=position, positions=positions, mask=AttentionMask(**fields))
    allowed = naive_allowed(B, T, **fields)
    expected = naive_mla(attention, x, allowed, positions.tolist(), base=500.0)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "case",
    [
        # (position plugin, its knobs, MLA knobs, the base and position scale the decoupled rope must use)
        ("none", {}, {"rope_base": 300.0}, 300.0, 1.0),
        ("learned", {}, {"rope_base": 300.0, "q_lora_rank": None}, 300.0, 1.0),
        ("rope", {"base": 500.0, "scaling": "linear", "factor": 2.0}, {}, 500.0, 0.5),
        ("rope", {"base": 500.0, "scaling": "ntk", "factor": 4.0}, {}, 500.0 * 4.0 ** (4 / (4 - 2)), 1.0),
        ("alibi", {}, {"rope_base": 300.0}, 300.0, 1.0),
        ("alibi", {}, {"rope_head_dim": 0}, None, 1.0),
    ],
    ids=["nope", "learned_no_q_lora", "rope_linear", "rope_ntk", "alibi_plus_rope", "alibi_only"],
)
@pytest.mark.parametrize("latent_norm", [True, False])
def test_positions_and_options_match_naive(case, latent_norm):
    name, position_knobs, knobs, base, scale = case
    attention = make_mla(latent_norm=latent_norm, **{**KNOBS, **knobs})
    position = make_position(name, **position_knobs)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    positions = torch.arange(T)[None] + 5  # an offset, so positions other than 0..T-1 are rotated
    out = attention(x, position=position, positions=positions, mask=AttentionMask(causal=True))
    slopes = [2.0 ** (-8.0 * k / N_HEADS) for k in range(1, N_HEADS + 1)] if name == "alibi" else None
    pos = positions.expand(B, T).tolist()
    expected = naive_mla(attention, x, naive_allowed(B, T), pos, base=base or 1.0, scale=scale, slopes=slopes)
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------- standard attention as a special case


@pytest.mark.parametrize("n_kv_heads", [N_HEADS, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("absorb", ["never", "always"])
def test_full_rank_latent_represents_multi_head_attention(n_kv_heads, absorb):
    """kv_lora_rank = dim, no rope, no latent norm: with W_DKV = P (invertible), W_UK = W_K P^-1 and
    W_UV = W_V P^-1, MLA computes exactly the keys and values of multi-head (grouped-query) attention."""
    torch.manual_seed(0)
    hd = DIM // N_HEADS
    mha = MultiHeadAttention(dim=DIM, n_heads=N_HEADS, n_kv_heads=n_kv_heads, dropout=0.0).double()
    mla = MultiHeadLatentAttention(
        dim=DIM, n_heads=N_HEADS, n_kv_heads=n_kv_heads, kv_lora_rank=DIM, rope_head_dim=0, nope_head_dim=hd,
        v_head_dim=hd, latent_norm=False, absorb=absorb,
    ).double()  # fmt: skip
    change_of_basis = torch.randn(DIM, DIM, dtype=torch.float64) + 3 * torch.eye(DIM, dtype=torch.float64)
    inverse = torch.linalg.inv(change_of_basis)
    with torch.no_grad():
        mla.q_proj.weight.copy_(mha.q_proj.weight)
        mla.kv_down_proj.weight.copy_(change_of_basis)
        mla.k_up_proj.weight.copy_(mha.k_proj.weight @ inverse)
        mla.v_up_proj.weight.copy_(mha.v_proj.weight @ inverse)
        mla.o_proj.weight.copy_(mha.o_proj.weight)
    position = make_position("none")
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    for mask in (AttentionMask(causal=True), AttentionMask(**MASKS["left_padding"])):
        kwargs = {"position": position, "positions": torch.arange(T)[None], "mask": mask}
        torch.testing.assert_close(mla(x, **kwargs), mha(x, **kwargs))


# ---------------------------------------------------------------- decoding from the latent cache


@pytest.mark.parametrize("absorb", ["decode", "never"])
@pytest.mark.parametrize("padded", [False, True])
def test_cached_decoding_equals_uncached_forward(absorb, padded):
    attention = make_mla(absorb=absorb, **KNOBS)
    position = make_position("rope", base=500.0)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    padding = torch.arange(T)[None] >= torch.tensor([[0], [2]]) if padded else None  # left padding of row 1

    def mask(S):
        return AttentionMask(causal=True, padding=None if padding is None else padding[:, :S])

    full = attention(x, position=position, positions=torch.arange(T)[None], mask=mask(T))
    for chunks in ([1] * T, [3, 1, 2, 1]):  # token by token; prefill 3, then one, a chunk of two, one
        cache = attention.make_cache(B, T, dtype=torch.float64)
        outs, start = [], 0
        for size in chunks:
            stop = start + size
            outs.append(
                attention(x[:, start:stop], position=position, positions=torch.arange(start, stop)[None],
                          mask=mask(stop), cache=cache)
            )  # fmt: skip
            start = stop
        assert cache.length == T
        torch.testing.assert_close(torch.cat(outs, dim=1), full)


def test_absorbed_decoding_equals_plain_decoding_and_builds_no_per_head_keys():
    plain, absorbed = make_mla(absorb="never", **KNOBS), make_mla(absorb="decode", **KNOBS)
    position = make_position("rope", base=500.0)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    calls = []
    absorbed.k_up_proj.register_forward_hook(lambda *_: calls.append("k_up"))
    absorbed.v_up_proj.register_forward_hook(lambda *_: calls.append("v_up"))
    caches = [plain.make_cache(B, T, dtype=torch.float64), absorbed.make_cache(B, T, dtype=torch.float64)]
    for t in range(T):
        step = {"position": position, "positions": torch.tensor([[t]]), "mask": AttentionMask(causal=True)}
        out_plain = plain(x[:, t : t + 1], cache=caches[0], **step)
        out_absorbed = absorbed(x[:, t : t + 1], cache=caches[1], **step)
        torch.testing.assert_close(out_absorbed, out_plain)
    assert calls == ["k_up", "v_up"]  # only the first step (empty cache) up-projects the latents
    torch.testing.assert_close(caches[0].c_kv, caches[1].c_kv)


def test_cache_holds_kv_lora_rank_plus_rope_head_dim_numbers_per_token():
    attention = make_mla(**KNOBS)
    max_len = 16
    cache = attention.make_cache(3, max_len, dtype=torch.float64)
    assert isinstance(cache, LatentCache)
    numbers = sum(buffer.numel() for buffer in cache.buffers())
    assert numbers == 3 * max_len * (KNOBS["kv_lora_rank"] + KNOBS["rope_head_dim"])
    mha_numbers = sum(b.numel() for b in KVCache(3, N_HEADS, max_len, DIM // N_HEADS).buffers())
    assert numbers * 4 < mha_numbers  # 14 numbers per token against 2 * 4 * 8 = 64
    # DeepSeek-V2's shape (dim 5120, 128 heads of 128, d_c = 512, d_h^R = 64): 576 numbers per token and
    # layer, against 2 * 128 * 128 = 32768 for multi-head attention (built on the meta device: no memory)
    with torch.device("meta"):
        big = MultiHeadLatentAttention(
            dim=5120, n_heads=128, kv_lora_rank=512, q_lora_rank=1536, rope_head_dim=64, nope_head_dim=128,
            v_head_dim=128,
        )  # fmt: skip
        big_numbers = sum(b.numel() for b in big.make_cache(1, 1).buffers())
        mha_numbers = sum(b.numel() for b in KVCache(1, 128, 1, 128).buffers())
    assert (big_numbers, mha_numbers) == (576, 32768)


def test_cache_refuses_overflow_and_reset_forgets():
    attention = make_mla(**KNOBS)
    cache = attention.make_cache(1, 2, dtype=torch.float64)
    x = torch.randn(1, 2, DIM, dtype=torch.float64)
    kwargs = {"position": make_position("rope"), "mask": AttentionMask(causal=True), "cache": cache}
    first = attention(x, positions=torch.arange(2)[None], **kwargs)
    with pytest.raises(ValueError, match="holds 2 positions"):
        attention(x[:, :1], positions=torch.tensor([[2]]), **kwargs)
    cache.reset()
    assert cache.length == 0
    torch.testing.assert_close(attention(x, positions=torch.arange(2)[None], **kwargs), first)


# ---------------------------------------------------------------- inside a model


def mla_decoder(decoder_factory, **knobs):
    attention = partial(MultiHeadLatentAttention, kv_lora_rank=16, q_lora_rank=12, rope_head_dim=4, **knobs)
    return decoder_factory(attention=attention, norm="RMSNorm", ffn="SwiGLU", position=partial(RoPE, base=500.0))


@pytest.mark.parametrize("absorb", ["decode", "always"])
def test_decoder_is_causal_and_decodes_with_the_latent_cache(decoder_factory, absorb):
    torch.manual_seed(0)
    model = mla_decoder(decoder_factory, absorb=absorb).double().eval()
    ids = torch.randint(0, 50, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = torch.randint(0, 50, (2, 4))
    with torch.no_grad():
        logits, logits_changed = model(ids), model(changed)
        torch.testing.assert_close(logits[:, :6], logits_changed[:, :6])
        assert not torch.allclose(logits[:, 6:], logits_changed[:, 6:])
        cache = model.make_cache(2, 10)
        assert all(isinstance(c, LatentCache) for c in cache)
        steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), logits)


def test_it_trains(decoder_factory):
    torch.manual_seed(0)
    model = mla_decoder(decoder_factory)
    pattern = torch.randint(0, 50, (8,))
    ids = pattern.repeat(4, 4)  # (4, 32): a repeated pattern
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_meta_device_build_and_reset_parameters(decoder_factory):
    with torch.device("meta"):
        model = mla_decoder(decoder_factory)
    model.to_empty(device="cpu")
    model.reset_parameters()
    attention = model.blocks[0].attention
    assert torch.equal(attention.kv_latent_norm.weight, torch.ones(16))
    assert torch.equal(attention.q_latent_norm.weight, torch.ones(12))
    assert torch.isfinite(model(torch.randint(0, 50, (1, 5)))).all()


def test_bfloat16_forward_keeps_dtype():
    attention = MultiHeadLatentAttention(dim=DIM, n_heads=N_HEADS, **KNOBS).to(torch.bfloat16)
    x = torch.randn(2, 5, DIM, dtype=torch.bfloat16)
    out = attention(x, position=make_position("rope"), positions=torch.arange(5)[None], mask=AttentionMask())
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


# ---------------------------------------------------------------- refusals


class WholeHeadRotation(Position):
    def rotate(self, q, k, positions):
        return q.flip(-1), k.flip(-1)


@pytest.mark.parametrize(
    "knobs, match",
    [
        ({"n_kv_heads": 3}, "n_kv_heads=3"),
        ({"rope_head_dim": 3}, "rope_head_dim=3"),
        ({"kv_lora_rank": 0}, "kv_lora_rank=0"),
        ({"q_lora_rank": 0}, "q_lora_rank=0"),
        ({"absorb": "sometimes"}, "absorb='sometimes'"),
        ({"n_heads": 5}, "n_heads=5"),
    ],
)
def test_refuses_bad_knobs(knobs, match):
    with pytest.raises(ConfigError, match=match):
        MultiHeadLatentAttention(**{"dim": DIM, "n_heads": N_HEADS, **knobs})


def test_check_compatible_refusals_and_acceptances():
    attention = make_mla(**KNOBS)
    for ok in ("none", "learned", "alibi", "rope"):
        attention.check_compatible(make_position(ok))
    with pytest.raises(ConfigError, match="WholeHeadRotation"):
        attention.check_compatible(WholeHeadRotation())
    with pytest.raises(ConfigError, match="rope_head_dim=0"):
        make_mla(**{**KNOBS, "rope_head_dim": 0}).check_compatible(make_position("rope"))
    with pytest.raises(ConfigError, match="rope_head_dim > 2"):
        make_mla(**{**KNOBS, "rope_head_dim": 2}).check_compatible(make_position("rope", scaling="ntk", factor=2.0))


def test_model_build_refuses_rope_without_rope_channels(decoder_factory):
    with pytest.raises(ConfigError, match="rope_head_dim=0"):
        decoder_factory(attention=partial(MultiHeadLatentAttention, rope_head_dim=0), position="RoPE")


def test_cross_attention_is_refused():
    attention = make_mla(**KNOBS)
    x = torch.randn(1, 3, DIM, dtype=torch.float64)
    with pytest.raises(ConfigError, match="self-attention only"):
        attention(x, position=make_position("none"), positions=torch.arange(3)[None], mask=AttentionMask(), context=x)


@pytest.mark.parametrize("absorb", ["never", "always"])
def test_causal_training_keeps_no_score_matrix_so_memory_stays_linear(absorb):
    """Values narrower than queries are padded for SDPA, so its fused kernel (no (T, S) scores) applies."""
    att, T = make_mla(absorb=absorb).float(), 64  # float32: the fused CPU kernel does not take float64
    x = torch.randn(2, T, att.o_proj.out_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        position = NoPosition(dim=DIM, n_heads=N_HEADS, head_dim=DIM // N_HEADS, max_seq_len=T)
        att(x, position=position, positions=torch.arange(T)[None], mask=AttentionMask(causal=True))
    assert saved and not [shape for shape in saved if list(shape).count(T) >= 2]


@pytest.mark.parametrize("scaling", ["llama3", "yarn"])
def test_rope_scalings_it_cannot_rederive_are_refused(scaling):
    rope = RoPE(dim=DIM, n_heads=N_HEADS, head_dim=DIM // N_HEADS, max_seq_len=64, scaling=scaling, factor=4.0)
    with pytest.raises(ConfigError, match=scaling):
        make_mla().check_compatible(rope)
