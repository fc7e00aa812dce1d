"""The table engine: sharded and prefix-less checkpoints, refusal by name, atomic writes, export of native models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightningllm.convert import ConversionError, from_hf, to_hf
from lightningllm.convert.families import FAMILIES
from lightningllm.io import export, load

transformers = pytest.importorskip("transformers")


def gpt2(parity, path, **overrides):
    base = dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    return parity.save_hf(transformers.GPT2LMHeadModel, transformers.GPT2Config(**{**base, **overrides}), path)


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_sharded_checkpoint_converts_to_the_same_weights(parity, tmp_path):
    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    parity.save_hf(transformers.GPT2LMHeadModel, config, tmp_path / "one")
    parity.save_hf(transformers.GPT2LMHeadModel, config, tmp_path / "many", max_shard_size="10KB")
    assert len(list((tmp_path / "many").glob("model-0000*-of-0000*.safetensors"))) > 2
    from_hf(tmp_path / "one", tmp_path / "a")
    from_hf(tmp_path / "many", tmp_path / "b")
    assert (
        load_file(tmp_path / "a" / "model.safetensors").keys() == load_file(tmp_path / "b" / "model.safetensors").keys()
    )
    for name, tensor in load_file(tmp_path / "a" / "model.safetensors").items():
        assert torch.equal(tensor, load_file(tmp_path / "b" / "model.safetensors")[name])


def test_base_model_names_and_legacy_buffers_are_understood(parity, tmp_path):
    """The hub's gpt2 stores names without ``transformer.`` and the old causal-mask buffers."""
    hf_dir = gpt2(parity, tmp_path / "hf")
    weights = load_file(hf_dir / "model.safetensors")
    legacy = {name.removeprefix("transformer."): tensor for name, tensor in weights.items()}
    legacy["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)
    save_file(legacy, hf_dir / "model.safetensors", metadata={"format": "pt"})
    result = from_hf(hf_dir, tmp_path / "export")
    assert any("h.0.attn.bias" in note and "causal-mask" in note for note in result.notes)
    ours, _ = load(tmp_path / "export")
    ids, mask = parity.padded_batch()
    assert (
        parity.decoder_logit_diff(parity.load_hf(transformers.GPT2LMHeadModel, tmp_path / "hf"), ours, ids, mask) < 1e-4
    )


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
        ({"activation_function": "quick_gelu"}, "activation_function='quick_gelu'"),
        ({"some_new_knob": 3}, "some_new_knob=3"),
        ({"embd_pdrop": 0.0}, "embd_pdrop=0.0"),
    ],
)
def test_unsupported_fields_are_refused_by_name(parity, tmp_path, changes, named):
    hf_dir = gpt2(parity, tmp_path / "hf")
    edit_config(hf_dir, **changes)
    with pytest.raises(ConversionError, match=named.replace("(", r"\(")):
        from_hf(hf_dir, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_every_refusal_is_named_in_one_error(parity, tmp_path):
    hf_dir = gpt2(parity, tmp_path / "hf")
    edit_config(hf_dir, scale_attn_weights=False, add_cross_attention=True)
    with pytest.raises(ConversionError) as err:
        from_hf(hf_dir, tmp_path / "export")
    assert "scale_attn_weights=False" in str(err.value) and "add_cross_attention=True" in str(err.value)


def test_unknown_model_type_lists_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bart"}))
    with pytest.raises(ConversionError, match="model_type='bart'.*" + ", ".join(FAMILIES)):
        from_hf(tmp_path, tmp_path / "export")


def test_unexpected_and_missing_weights_are_named(parity, tmp_path):
    hf_dir = gpt2(parity, tmp_path / "hf")
    weights = load_file(hf_dir / "model.safetensors")
    weights["transformer.h.0.attn.q_norm.weight"] = torch.ones(8)
    del weights["transformer.h.1.mlp.c_fc.bias"]
    save_file(weights, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="missing transformer.h.1.mlp.c_fc.bias.*unexpected transformer.h.0"):
        from_hf(hf_dir, tmp_path / "export")


def test_failed_conversion_leaves_previous_folders_intact(parity, tmp_path, monkeypatch):
    hf_dir = gpt2(parity, tmp_path / "hf")
    from_hf(hf_dir, tmp_path / "export")
    to_hf(tmp_path / "export", tmp_path / "back")
    before = {p: p.read_bytes() for folder in ("export", "back") for p in (tmp_path / folder).iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lightningllm.convert.hf.save_file", crash)
    monkeypatch.setattr("lightningllm.io.save_model", crash)
    with pytest.raises(OSError):
        from_hf(hf_dir, tmp_path / "export")
    with pytest.raises(OSError):
        to_hf(tmp_path / "export", tmp_path / "back")
    with pytest.raises(OSError):
        to_hf(tmp_path / "export", tmp_path / "new")
    assert {p: p.read_bytes() for folder in ("export", "back") for p in (tmp_path / folder).iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "export", "hf"]  # no staging folder left


def test_natively_built_llama_exports_to_transformers(parity, tmp_path, llama_like):
    export(llama_like, tmp_path / "export")
    assert to_hf(tmp_path / "export", tmp_path / "hf").family == "llama"
    hf_model = parity.load_hf(transformers.LlamaForCausalLM, tmp_path / "hf")
    ids, mask = parity.padded_batch()
    ids = ids % llama_like.vocab_size
    assert parity.decoder_logit_diff(hf_model, llama_like.eval(), ids, mask) < parity.TOL


def test_model_no_family_expresses_is_refused_with_reasons(tmp_path, decoder_factory):
    export(decoder_factory(position="ALiBi"), tmp_path / "export")
    with pytest.raises(ConversionError, match="No Hugging Face family represents"):
        to_hf(tmp_path / "export", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
