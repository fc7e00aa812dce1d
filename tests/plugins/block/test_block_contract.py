"""Every registered block layout honours BlockFactory and hands the attention keywords on."""

import pytest
from jsonargparse import ArgumentParser

from lightningllm import registry
from lightningllm.contracts import Block, BlockFactory


@pytest.mark.parametrize("name", registry.available("block"))
def test_factory_keywords_and_shape(name, parts, attention_kwargs, x):
    block = registry.get("block", name)(
        attention=parts.attention, ffn=parts.ffn, norm_1=parts.norm_1, norm_2=parts.norm_2, dropout=0.0
    )
    assert isinstance(block, Block)
    y = block(x, **attention_kwargs)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert parts.attention.seen["cache"] is attention_kwargs["cache"]
    y.square().mean().backward()
    assert all(p.grad is not None for p in block.parameters()), f"{name} leaves a parameter unused"


@pytest.mark.parametrize("name", registry.available("block"))
def test_parsed_from_config_as_factory(name, parts):
    # What LightningCLI does with `block: {class_path: <name>}`: every knob needs a default and a type.
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--block", type=BlockFactory)
    cls = registry.get("block", name)
    factory = parser.instantiate_classes(parser.parse_args([f"--block={cls.__module__}.{cls.__name__}"])).block
    block = factory(attention=parts.attention, ffn=parts.ffn, norm_1=parts.norm_1, norm_2=parts.norm_2, dropout=0.0)
    assert isinstance(block, cls)
