"""Every registered ffn plugin honours FeedForwardFactory: built from dim, hidden_dim, dropout."""

import pytest
import torch
from jsonargparse import ArgumentParser

from lightningllm import registry
from lightningllm.contracts import FeedForward, FeedForwardFactory


@pytest.mark.parametrize("name", registry.available("ffn"))
def test_factory_keywords_and_shape(name):
    torch.manual_seed(0)
    ffn = registry.get("ffn", name)(dim=8, hidden_dim=24, dropout=0.0)
    assert isinstance(ffn, FeedForward)
    x = torch.randn(2, 5, 8, requires_grad=True)
    y = ffn(x)
    assert y.shape == (2, 5, 8) and y.dtype == x.dtype
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", registry.available("ffn"))
def test_meta_device_build(name):
    with torch.device("meta"):
        ffn = registry.get("ffn", name)(dim=8, hidden_dim=24, dropout=0.0)
    ffn = ffn.to_empty(device="cpu")
    for module in ffn.modules():
        if module is not ffn and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert ffn(torch.randn(1, 3, 8)).shape == (1, 3, 8)


@pytest.mark.parametrize("name", registry.available("ffn"))
def test_parsed_from_config_as_factory(name):
    # What LightningCLI does with `ffn: {class_path: <name>}`: every knob needs a default and a type.
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--ffn", type=FeedForwardFactory)
    cls = registry.get("ffn", name)
    config = parser.parse_args([f"--ffn={cls.__module__}.{cls.__name__}"])
    factory = parser.instantiate_classes(config).ffn
    assert isinstance(factory(dim=8, hidden_dim=24, dropout=0.0), cls)
