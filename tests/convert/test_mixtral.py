"""Mixtral import/export: top-2 mixture of SwiGLU experts, no token dropping, sharded checkpoints."""

from __future__ import annotations

import json

import pytest

from lightningllm.io import load

transformers = pytest.importorskip("transformers")


def mixtral_config(**overrides):
    base = dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=None,
    )  # fmt: skip
    return transformers.MixtralConfig(**{**base, **overrides})


def test_sharded_mixtral_matches_transformers(parity, tmp_path):
    parity.check_decoder(transformers.MixtralForCausalLM, mixtral_config(), tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # the test did read several shards
    model, _ = load(tmp_path / "export")
    moe = model.config["ffn"]["init_args"]
    assert moe["n_experts"] == 4 and moe["top_k"] == 2 and moe["capacity_factor"] is None
    assert moe["aux_loss_weight"] == 0.0  # HF adds no router loss unless output_router_logits


def test_mixtral_with_sliding_window_and_router_loss(parity, tmp_path):
    config = mixtral_config(sliding_window=5, output_router_logits=True, router_aux_loss_coef=0.02)
    parity.check_decoder(transformers.MixtralForCausalLM, config, tmp_path)
    model, _ = load(tmp_path / "export")
    assert model.config["ffn"]["init_args"]["aux_loss_weight"] == 0.02
    back = transformers.AutoConfig.from_pretrained(tmp_path / "back")
    assert back.output_router_logits and back.router_aux_loss_coef == 0.02 and back.sliding_window == 5
