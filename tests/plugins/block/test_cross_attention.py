"""Cross-attention in the block layouts (self-attention -> cross-attention -> FFN) against a hand-written reference."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightningllm.contracts import Block, Position
from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask
from lightningllm.registry import get

DIM, HEADS, T, S = 16, 4, 5, 7


def random_layer_norm(dim: int) -> nn.LayerNorm:
    norm = nn.LayerNorm(dim)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
        norm.bias.normal_(0.0, 0.5)
    return norm


def build(layout: str, layer_scale: float | None = None, **knobs) -> Block:
    torch.manual_seed(0)
    attention = get("attention", "MultiHeadAttention")
    ffn = get("ffn", "MLP")(dim=DIM, hidden_dim=32, dropout=0.0)
    block = get("block", layout)(
        attention=attention(dim=DIM, n_heads=HEADS), ffn=ffn, norm_1=random_layer_norm(DIM),
        norm_2=random_layer_norm(DIM), dropout=0.0, dim=DIM, layer_scale=layer_scale,
        cross_attention=attention(dim=DIM, n_heads=HEADS), norm_cross=random_layer_norm(DIM), **knobs,
    )  # fmt: skip
    if layer_scale is not None:
        with torch.no_grad():  # distinct scales, so a mix-up of branches shows
            for scale in (block.attention_scale, block.cross_attention_scale, block.ffn_scale):
                scale.uniform_(0.5, 1.5)
    return block


def naive_attention(attn: nn.Module, x: torch.Tensor, keys_from: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Loop over batch and heads: softmax(q k^T / sqrt(hd)) v over the allowed keys only, then o_proj."""
    B, Tq, _ = x.shape
    hd = DIM // HEADS
    q, k, v = attn.q_proj(x), attn.k_proj(keys_from), attn.v_proj(keys_from)
    out = torch.zeros(B, Tq, DIM)
    for b in range(B):
        for h in range(HEADS):
            cols = slice(h * hd, (h + 1) * hd)
            scores = q[b, :, cols] @ k[b, :, cols].T / math.sqrt(hd)  # (Tq, Sk)
            scores = scores.masked_fill(~allowed[b], float("-inf"))
            out[b, :, cols] = scores.softmax(-1) @ v[b, :, cols]
    return attn.o_proj(out)


def reference(block: Block, layout: str, x, context, padding, shared_norm: bool = True) -> torch.Tensor:
    """The layouts written out by hand (Vaswani et al. 2017 for PostNorm, T5 for PreNorm)."""
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool)).expand(x.shape[0], T, T)
    real = padding[:, None, :].expand(-1, T, -1)

    def scaled(y, scale):
        return y if scale is None else y * scale

    def self_attn(h):
        return scaled(naive_attention(block.attention, h, h, causal), block.attention_scale)

    def cross(h):
        return scaled(naive_attention(block.cross_attention, h, context, real), block.cross_attention_scale)

    def ffn(h):
        return scaled(block.ffn(h), block.ffn_scale)

    if layout == "PreNorm":
        h = x + self_attn(block.norm_1(x))
        h = h + cross(block.norm_cross(h))
        return h + ffn(block.norm_2(h))
    if layout == "PostNorm":
        h = block.norm_1(x + self_attn(x))
        h = block.norm_cross(h + cross(h))
        return block.norm_2(h + ffn(h))
    n = block.norm_1(x)
    if shared_norm:
        return x + self_attn(n) + cross(n) + ffn(n)
    return x + self_attn(n) + cross(block.norm_cross(x)) + ffn(block.norm_2(x))


def inputs():
    torch.manual_seed(1)
    x, context = torch.randn(2, T, DIM), torch.randn(2, S, DIM)
    padding = torch.ones(2, S, dtype=torch.bool)
    padding[1, 4:] = False  # the second source is 4 tokens long
    return x, context, padding


def call(block, x, context, padding, **kwargs):
    return block(
        x, position=Position(), positions=torch.arange(T)[None], mask=AttentionMask(causal=True), context=context,
        context_mask=AttentionMask(causal=False, padding=padding), **kwargs,
    )  # fmt: skip


CASES = [("PreNorm", {}), ("PostNorm", {}), ("Parallel", {}), ("Parallel", {"shared_norm": False})]


@pytest.mark.parametrize("layer_scale", [None, 0.1])
@pytest.mark.parametrize("layout, knobs", CASES)
def test_matches_the_hand_written_layout(layout, knobs, layer_scale):
    block = build(layout, layer_scale, **knobs).eval()
    x, context, padding = inputs()
    expected = reference(block, layout, x, context, padding, knobs.get("shared_norm", True))
    torch.testing.assert_close(call(block, x, context, padding), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout, knobs", CASES)
def test_every_parameter_is_used_and_padded_context_is_invisible(layout, knobs):
    block = build(layout, 0.1, **knobs)
    x, context, padding = inputs()
    y = call(block, x, context, padding)
    y.square().mean().backward()
    assert all(p.grad is not None for p in block.parameters()), "a parameter goes unused (DDP would refuse)"
    if knobs.get("shared_norm", layout == "Parallel"):
        assert block.norm_cross is None  # one norm for every branch, as for norm_2
    changed = context.clone()
    changed[1, 4:] = 100.0  # padded context tokens
    torch.testing.assert_close(call(block, x, changed, padding), y)
    changed[1, 0] += 1.0  # a real one
    assert not torch.allclose(call(block, x, changed, padding)[1], y[1])


@pytest.mark.parametrize("layout, knobs", CASES)
def test_cached_step_by_step_equals_the_full_pass(layout, knobs):
    block = build(layout, **knobs).eval()
    x, context, padding = inputs()
    full = call(block, x, context, padding)
    cache = block.attention.make_cache(2, T)
    cross_cache = block.cross_attention.make_cache(2, S)
    for t in range(T):
        y = block(
            x[:, t : t + 1], position=Position(), positions=torch.tensor([[t]]), mask=AttentionMask(causal=True),
            cache=cache, context=context, context_mask=AttentionMask(causal=False, padding=padding),
            cross_cache=cross_cache,
        )  # fmt: skip
        torch.testing.assert_close(y, full[:, t : t + 1], atol=1e-5, rtol=1e-5)
        assert cross_cache.length == S  # filled once by the first step, then only read


def test_blocks_without_cross_attention_refuse_a_context_and_vice_versa():
    plain = get("block", "PreNorm")(
        attention=get("attention", "MultiHeadAttention")(dim=DIM, n_heads=HEADS), ffn=nn.Identity(),
        norm_1=nn.LayerNorm(DIM), norm_2=nn.LayerNorm(DIM),
    )  # fmt: skip
    assert plain.cross_attention is None and plain.cross_attention_scale is None
    x, context, padding = inputs()
    with pytest.raises(ConfigError, match="without a cross_attention child"):
        call(plain, x, context, padding)
    with pytest.raises(ConfigError, match="needs context="):
        build("PreNorm")(x, position=Position(), positions=torch.arange(T)[None], mask=AttentionMask(causal=True))


@pytest.mark.parametrize("layout", ["PreNorm", "PostNorm", "Parallel"])
def test_a_cross_attending_block_learns_to_read_the_context(layout):
    """Target: the mean of the context at every position, which only the cross-attention branch can see."""
    block = build(layout)
    torch.manual_seed(3)
    x, context = torch.randn(16, T, DIM), torch.randn(16, S, DIM)
    target = context.mean(dim=1, keepdim=True).expand(-1, T, -1) * 2.0  # (16, T, DIM), variance 4/7
    opt = torch.optim.Adam(block.parameters(), lr=1e-2)
    kwargs = dict(position=Position(), positions=torch.arange(T)[None], mask=AttentionMask(causal=True))
    losses = []
    for _ in range(40):
        loss = F.mse_loss(block(x, context=context, **kwargs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0] and losses[-1] < 0.3  # about half of 4/7: the context was read


def test_scale_residual_counts_three_branches():
    block = build("Parallel", scale_residual=True)
    assert block.branch_scale == pytest.approx(1 / math.sqrt(3))
    plain = partial(get("block", "Parallel"), scale_residual=True)(
        attention=nn.Identity(), ffn=nn.Identity(), norm_1=nn.Identity(), norm_2=nn.Identity()
    )
    assert plain.branch_scale == pytest.approx(1 / math.sqrt(2))
