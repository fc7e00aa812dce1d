import pytest

from lightningllm import registry
from lightningllm.errors import DuplicatePluginError, PluginNotFoundError


def test_unknown_name_lists_registered_plugins(monkeypatch):
    monkeypatch.setitem(registry._registry, "norm", {"LayerNorm": object, "RMSNorm": object})
    with pytest.raises(PluginNotFoundError) as err:
        registry.get("norm", "BatchNorm")
    assert "'BatchNorm'" in str(err.value) and "LayerNorm, RMSNorm" in str(err.value)


def test_unknown_kind_lists_kinds():
    with pytest.raises(PluginNotFoundError, match="attention, ffn"):
        registry.available("attn")


def test_duplicate_name_raises(monkeypatch):
    monkeypatch.setitem(registry._registry, "ffn", {})

    @registry.register("ffn")
    class Twin:
        pass

    class Other:
        pass

    Other.__name__ = "Twin"
    with pytest.raises(DuplicatePluginError, match="already belongs"):
        registry.register("ffn")(Other)
    assert registry.get("ffn", "Twin") is Twin


def test_register_under_explicit_name(monkeypatch):
    monkeypatch.setitem(registry._registry, "ffn", {})

    @registry.register("ffn", name="Custom")
    class Impl:
        pass

    assert registry.get("ffn", "Custom") is Impl
    assert registry.source("ffn", "Custom") == __name__
