"""Every registered norm plugin honours NormFactory: built from dim alone, (..., dim) -> (..., dim)."""

import pytest
import torch
from jsonargparse import ArgumentParser

from lightningllm import registry
from lightningllm.contracts import Norm, NormFactory


@pytest.mark.parametrize("name", registry.available("norm"))
def test_factory_keywords_and_shape(name):
    torch.manual_seed(0)
    norm = registry.get("norm", name)(dim=8)
    assert isinstance(norm, Norm)
    for shape in [(2, 5, 8), (8,), (2, 3, 4, 8)]:
        x = torch.randn(*shape)
        y = norm(x)
        assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("name", registry.available("norm"))
def test_meta_device_build(name):
    with torch.device("meta"):
        norm = registry.get("norm", name)(dim=8)
    norm = norm.to_empty(device="cpu")
    torch.manual_seed(0)
    if any(True for _ in norm.parameters(recurse=False)):
        assert hasattr(norm, "reset_parameters"), f"{name} owns parameters but has no reset_parameters()"
    for module in norm.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    torch.manual_seed(0)
    fresh = registry.get("norm", name)(dim=8)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(norm.state_dict()[key], value, msg=f"{name}.{key} differs after reset")


@pytest.mark.parametrize("name", registry.available("norm"))
def test_parsed_from_config_as_factory(name):
    # What LightningCLI does with `norm: {class_path: <name>}`: every knob needs a default and a type.
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--norm", type=NormFactory)
    cls = registry.get("norm", name)
    config = parser.parse_args([f"--norm={cls.__module__}.{cls.__name__}"])
    factory = parser.instantiate_classes(config).norm
    assert isinstance(factory(dim=8), cls)
