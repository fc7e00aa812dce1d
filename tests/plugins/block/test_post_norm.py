import torch

from lightningllm import registry
from lightningllm_plugins.block.post_norm import PostNorm


def build(parts, dropout: float = 0.0) -> PostNorm:
    return PostNorm(parts.attention, parts.ffn, parts.norm_1, parts.norm_2, dropout=dropout)


def formula(parts, x, attention_kwargs):
    """LayerNorm(x + Sublayer(x)) twice (Vaswani et al. 2017, section 5.4)."""
    h = parts.norm_1(x + parts.attention(x, **attention_kwargs))
    return parts.norm_2(h + parts.ffn(h))


def test_matches_formula(parts, attention_kwargs, x):
    block = build(parts).eval()
    torch.testing.assert_close(block(x, **attention_kwargs), formula(parts, x, attention_kwargs))


def test_output_is_normalised(parts, attention_kwargs, x):
    # The last operation is norm_2: undoing its affine map leaves zero mean, unit variance rows.
    out = build(parts).eval()(x, **attention_kwargs)
    z = (out - parts.norm_2.bias) / parts.norm_2.weight
    torch.testing.assert_close(z.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-3, rtol=0)


def test_attention_keywords_pass_through(parts, attention_kwargs, x):
    build(parts)(x, **attention_kwargs)
    for key, value in attention_kwargs.items():
        assert parts.attention.seen[key] is value


def test_dropout_only_in_training(parts, attention_kwargs, x):
    block = build(parts, dropout=1.0).train()
    # Both branches dropped: only the two norms act on the residual stream.
    torch.testing.assert_close(block(x, **attention_kwargs), parts.norm_2(parts.norm_1(x)))
    block = build(parts, dropout=0.5).eval()
    torch.testing.assert_close(block(x, **attention_kwargs), formula(parts, x, attention_kwargs))
    block.train()
    torch.manual_seed(0)
    first = block(x, **attention_kwargs)
    assert not torch.allclose(first, block(x, **attention_kwargs))


def test_registered_and_built_by_factory_keywords(parts):
    block = registry.get("block", "PostNorm")(
        attention=parts.attention, ffn=parts.ffn, norm_1=parts.norm_1, norm_2=parts.norm_2, dropout=0.0
    )
    assert isinstance(block, PostNorm)


def test_it_trains(parts, attention_kwargs, train):
    losses = train(build(parts), attention_kwargs)
    assert losses[-1] < 0.5 * losses[0]


def test_decoder_adds_no_final_norm_after_post_norm_blocks():
    from torch import nn

    from lightningllm.contracts import Attention
    from lightningllm.models import Decoder
    from lightningllm.registry import get

    class Identity(Attention):
        def __init__(self, **kwargs):
            super().__init__()

        def forward(self, x, **kwargs):
            return x * 0

    post = Decoder(vocab_size=8, dim=4, n_layers=1, n_heads=1, attention=Identity, ffn=Identity,
                   norm=get("norm", "LayerNorm"), position=get("position", "NoPosition"),
                   block=get("block", "PostNorm"))  # fmt: skip
    assert isinstance(post.norm, nn.Identity)
