"""Adapters written as Hugging Face PEFT folders: PeftModel.from_pretrained on the converted Hugging Face model
gives our logits (LoRA, rsLoRA, DoRA, IA3, a glob over one layer), and what PEFT cannot hold is refused."""

from __future__ import annotations

import json

import pytest
import torch

from lightningllm.adapters import AdapterError, adapter_state_dict, disabled, save_adapter
from lightningllm.errors import ConfigError
from lightningllm.registry import get

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "head"]


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny Hugging Face Llama folder and our export converted from it."""
    from lightningllm.convert import from_hf

    root = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "hf")
    from_hf(root / "hf", root / "export")
    return root / "hf", root / "export"


def adapted(export, adapter):
    """Our converted Llama with ``adapter`` and every adapter tensor moved off its start (B, m, l random)."""
    from lightningllm.io import load

    model, _ = load(export)
    model.apply_transform(adapter)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in adapter_state_dict(model).items():
            if ".lora_A." not in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def peft_logits(hf_dir, folder, x):
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(hf, folder).eval()(input_ids=x).logits


@pytest.mark.parametrize(
    ("adapter", "init_args"),
    [
        ("LoRA", {"rank": 4, "alpha": 8.0, "targets": ALL}),
        ("LoRA", {"rank": 2, "alpha": 3.0, "targets": ["blocks.1.*.v_proj", "down_proj"], "rslora": True}),
        ("DoRA", {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj", "up_proj"]}),
        ("IA3", {"targets": ["k_proj", "v_proj", "down_proj"]}),
    ],
)
def test_peft_loads_the_folder_on_the_hf_model_and_gives_our_logits(hf_llama, tmp_path, adapter, init_args):
    hf_dir, export = hf_llama
    model = adapted(export, get("adapter", adapter)(**init_args))
    save_adapter(model, tmp_path / "peft", base="tiny-llama", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama"
    x = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(x)
        with disabled(model):
            assert (ours - model(x)).abs().max() > 1e-3  # the adapter changes the logits
    torch.testing.assert_close(peft_logits(hf_dir, tmp_path / "peft", x), ours, rtol=0, atol=1e-5)
    if "blocks.1.*.v_proj" in init_args.get("targets", []):
        assert "model.layers.1.self_attn.v_proj" in config["target_modules"]
        assert "model.layers.0.self_attn.v_proj" not in config["target_modules"]


def test_what_peft_cannot_hold_is_refused(hf_llama, tmp_path):
    _, export = hf_llama
    with pytest.raises(ConfigError, match="PrefixTuning has no Hugging Face PEFT equivalent"):
        save_adapter(adapted(export, get("adapter", "PrefixTuning")(n_tokens=2)), tmp_path / "a", format="peft")
    with pytest.raises(ConfigError, match="init='pissa' has changed its base weights"):
        save_adapter(adapted(export, get("adapter", "LoRA")(init="pissa")), tmp_path / "b", format="peft")
    model = adapted(export, get("adapter", "LoRA")())
    model.apply_transform(get("adapter", "LoRA")(name="second"))
    with pytest.raises(AdapterError, match="give its name .*holds default, second"):
        save_adapter(model, tmp_path / "c", format="peft")
    save_adapter(model, tmp_path / "c", format="peft", name="second")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
