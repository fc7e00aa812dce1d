import math

import pytest
import torch

from lightningllm import registry
from lightningllm_plugins.block.parallel import Parallel


def build(parts, dropout: float = 0.0, **knobs) -> Parallel:
    return Parallel(parts.attention, parts.ffn, parts.norm_1, parts.norm_2, dropout=dropout, **knobs)


def formula(parts, x, attention_kwargs, shared_norm: bool, scale_residual: bool):
    ffn_in = parts.norm_1(x) if shared_norm else parts.norm_2(x)
    branches = parts.attention(parts.norm_1(x), **attention_kwargs) + parts.ffn(ffn_in)
    return x + branches / math.sqrt(2) if scale_residual else x + branches


@pytest.mark.parametrize("shared_norm", [True, False])
@pytest.mark.parametrize("scale_residual", [False, True])
def test_matches_formula(parts, attention_kwargs, x, shared_norm, scale_residual):
    block = build(parts, shared_norm=shared_norm, scale_residual=scale_residual).eval()
    expected = formula(parts, x, attention_kwargs, shared_norm, scale_residual)
    torch.testing.assert_close(block(x, **attention_kwargs), expected)


def test_defaults_are_gpt_j(parts, attention_kwargs, x):
    block = build(parts)
    assert block.shared_norm and not block.scale_residual
    torch.testing.assert_close(block(x, **attention_kwargs), formula(parts, x, attention_kwargs, True, False))


def test_scale_is_one_over_sqrt_two(parts, attention_kwargs, x):
    plain = build(parts, scale_residual=False)(x, **attention_kwargs)
    scaled = build(parts, scale_residual=True)(x, **attention_kwargs)
    torch.testing.assert_close((scaled - x) * math.sqrt(2), plain - x)


def test_shared_norm_variants_differ_and_drop_unused_norm(parts, attention_kwargs, x):
    shared = build(parts, shared_norm=True)
    assert shared.norm_2 is None
    assert not any(name.startswith("norm_2.") for name, _ in shared.named_parameters())
    separate = build(parts, shared_norm=False)
    assert separate.norm_2 is parts.norm_2
    assert not torch.allclose(shared(x, **attention_kwargs), separate(x, **attention_kwargs))


@pytest.mark.parametrize("shared_norm", [True, False])
def test_every_parameter_gets_a_gradient(parts, attention_kwargs, x, shared_norm):
    # DDP (find_unused_parameters=False) fails on parameters that take no part in the loss.
    block = build(parts, shared_norm=shared_norm)
    block(x, **attention_kwargs).sum().backward()
    assert all(p.grad is not None for p in block.parameters())


def test_attention_keywords_pass_through(parts, attention_kwargs, x):
    build(parts)(x, **attention_kwargs)
    for key, value in attention_kwargs.items():
        assert parts.attention.seen[key] is value


def test_dropout_only_in_training(parts, attention_kwargs, x):
    block = build(parts, dropout=1.0, scale_residual=True).train()
    torch.testing.assert_close(block(x, **attention_kwargs), x)
    block = build(parts, dropout=0.5, shared_norm=False).eval()
    torch.testing.assert_close(block(x, **attention_kwargs), formula(parts, x, attention_kwargs, False, False))
    block.train()
    torch.manual_seed(0)
    first = block(x, **attention_kwargs)
    assert not torch.allclose(first, block(x, **attention_kwargs))


def test_registered_and_built_by_factory_keywords(parts):
    block = registry.get("block", "Parallel")(
        attention=parts.attention, ffn=parts.ffn, norm_1=parts.norm_1, norm_2=parts.norm_2, dropout=0.0
    )
    assert isinstance(block, Parallel)


@pytest.mark.parametrize("shared_norm", [True, False])
def test_it_trains(parts, attention_kwargs, train, shared_norm):
    losses = train(build(parts, shared_norm=shared_norm, scale_residual=True), attention_kwargs)
    assert losses[-1] < 0.5 * losses[0]
