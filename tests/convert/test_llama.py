"""Llama import/export: RoPE (plain and linearly scaled), RMSNorm, SwiGLU, GQA, biases, tied head; fine-tuning."""

from __future__ import annotations

import pytest
import torch

from lightningllm.convert import ConversionError, from_hf
from lightningllm.io import load
from lightningllm.tasks.causal_lm import CausalLM

transformers = pytest.importorskip("transformers")


def llama_config(**overrides):
    base = dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
    )  # fmt: skip
    return transformers.LlamaConfig(**{**base, **overrides})


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # GQA, untied head, default RoPE
        {  # linear RoPE scaling, biases everywhere, tied head, multi-head attention
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
            "attention_bias": True,
            "mlp_bias": True,
            "tie_word_embeddings": True,
            "num_key_value_heads": 4,
        },
    ],
    ids=["gqa", "linear-rope-bias-tied"],
)
def test_llama_matches_transformers(parity, tmp_path, overrides):
    parity.check_decoder(transformers.LlamaForCausalLM, llama_config(**overrides), tmp_path)


def test_llama_scaling_is_carried_by_the_rope_plugin(parity, tmp_path):
    config = llama_config(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    from_hf(parity.save_hf(transformers.LlamaForCausalLM, config, tmp_path / "hf"), tmp_path / "export")
    model, _ = load(tmp_path / "export")
    assert model.config["position"] == {
        "class_path": "RoPE",
        "init_args": {"base": 10000.0, "scaling": "linear", "factor": 4.0},
    }


def test_llama3_rope_type_is_refused_by_name(parity, tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
    hf_dir = parity.save_hf(transformers.LlamaForCausalLM, llama_config(rope_parameters=rope), tmp_path / "hf")
    with pytest.raises(ConversionError, match="rope_type='llama3'"):
        from_hf(hf_dir, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_converted_llama_fine_tunes_with_causal_lm(parity, tmp_path):
    hf_dir = parity.save_hf(transformers.LlamaForCausalLM, llama_config(), tmp_path / "hf")
    from_hf(hf_dir, tmp_path / "export")
    model, _ = load(tmp_path / "export")
    task = CausalLM(model.train())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(5, parity.VOCAB, (4, 17), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(8):
        loss, _, _ = task.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
