import torch

from lightningllm import registry
from lightningllm_plugins.block.pre_norm import PreNorm


def build(parts, dropout: float = 0.0) -> PreNorm:
    return PreNorm(parts.attention, parts.ffn, parts.norm_1, parts.norm_2, dropout=dropout)


def test_matches_formula(parts, attention_kwargs, x):
    block = build(parts).eval()
    h = x + parts.attention(parts.norm_1(x), **attention_kwargs)
    expected = h + parts.ffn(parts.norm_2(h))
    torch.testing.assert_close(block(x, **attention_kwargs), expected)


def test_attention_keywords_pass_through(parts, attention_kwargs, x):
    build(parts)(x, **attention_kwargs)
    for key, value in attention_kwargs.items():
        assert parts.attention.seen[key] is value


def test_dropout_only_in_training(parts, attention_kwargs, x):
    block = build(parts, dropout=1.0).train()
    # Both branches dropped entirely: the residual stream passes through untouched.
    torch.testing.assert_close(block(x, **attention_kwargs), x)
    block = build(parts, dropout=0.5)
    block.eval()
    h = x + parts.attention(parts.norm_1(x), **attention_kwargs)
    torch.testing.assert_close(block(x, **attention_kwargs), h + parts.ffn(parts.norm_2(h)))
    block.train()
    torch.manual_seed(0)
    first = block(x, **attention_kwargs)
    assert not torch.allclose(first, block(x, **attention_kwargs))


def test_registered_and_built_by_factory_keywords(parts):
    block = registry.get("block", "PreNorm")(
        attention=parts.attention, ffn=parts.ffn, norm_1=parts.norm_1, norm_2=parts.norm_2, dropout=0.1
    )
    assert isinstance(block, PreNorm) and block.norm_2 is parts.norm_2 and block.dropout.p == 0.1


def test_it_trains(parts, attention_kwargs, train):
    losses = train(build(parts), attention_kwargs)
    assert losses[-1] < 0.5 * losses[0]
