"""Mistral import/export: sliding-window attention (window shorter than the sequence), GQA."""

from __future__ import annotations

import pytest

from lightningllm.convert import from_hf, to_hf
from lightningllm.io import load

transformers = pytest.importorskip("transformers")


def mistral_config(**overrides):
    base = dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=4,
    )  # fmt: skip
    return transformers.MistralConfig(**{**base, **overrides})


def test_mistral_sliding_window_matches_transformers(parity, tmp_path):
    # a window of 4 over 12-token inputs and 26-token generations: most keys fall outside it
    parity.check_decoder(transformers.MistralForCausalLM, mistral_config(), tmp_path)
    model, _ = load(tmp_path / "export")
    assert model.config["attention"]["class_path"] == "SlidingWindowAttention"
    assert model.config["attention"]["init_args"]["window"] == 4


def test_window_is_the_one_of_hf(parity, tmp_path):
    """A window one key wider changes the logits: the parity above is not blind to the window."""
    hf_dir = parity.save_hf(transformers.MistralForCausalLM, mistral_config(), tmp_path / "hf")
    wider = parity.save_hf(transformers.MistralForCausalLM, mistral_config(sliding_window=5), tmp_path / "wide")
    from_hf(wider, tmp_path / "export")
    ours, _ = load(tmp_path / "export")
    ids, mask = parity.padded_batch()
    assert parity.decoder_logit_diff(parity.load_hf(transformers.MistralForCausalLM, hf_dir), ours, ids, mask) > 1e-3


def test_mistral_without_window_is_full_attention_both_ways(parity, tmp_path):
    parity.check_decoder(transformers.MistralForCausalLM, mistral_config(sliding_window=None), tmp_path)
    model, _ = load(tmp_path / "export")
    assert model.config["attention"]["class_path"] == "MultiHeadAttention"
    to_hf(tmp_path / "export", tmp_path / "again")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "again").model_type == "llama"  # first exact table
