"""BERT import/export: post-norm encoder, segment embeddings, embedding LayerNorm, MLM head; right padding."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightningllm.convert import from_hf, to_hf
from lightningllm.io import load

transformers = pytest.importorskip("transformers")


def bert_config(**overrides):
    base = dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, type_vocab_size=2,
    )  # fmt: skip
    return transformers.BertConfig(**{**base, **overrides})


def outputs_diff(hf_model, ours, padded) -> tuple[float, float]:
    """Max |HF - ours| of the last hidden states and of the MLM logits, right-padded batch with two segments."""
    ids, mask = padded(side="right")
    segments = (torch.arange(ids.shape[1]) >= 6).long().expand_as(ids) * mask
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=segments, output_hidden_states=True)
        hidden = ours.hidden_states(ids, attention_mask=mask, segment_ids=segments)
        logits = ours(ids, attention_mask=mask, segment_ids=segments)
    real = mask.bool()
    return (
        (theirs.hidden_states[-1] - hidden)[real].abs().max().item(),
        (theirs.logits - logits)[real].abs().max().item(),
    )


@pytest.mark.parametrize("tie", [True, False])
def test_bert_matches_transformers_both_ways(parity, tmp_path, tie):
    config = bert_config(tie_word_embeddings=tie, layer_norm_eps=1e-7)
    hf_dir = parity.save_hf(transformers.BertForMaskedLM, config, tmp_path / "hf")
    from_hf(hf_dir, tmp_path / "export")
    ours, _ = load(tmp_path / "export")
    assert ours.config["n_segments"] == 2 and ours.config["block"]["class_path"] == "PostNorm"
    hidden, logits = outputs_diff(parity.load_hf(transformers.BertForMaskedLM, hf_dir), ours, parity.padded_batch)
    assert hidden < parity.TOL and logits < parity.TOL

    to_hf(tmp_path / "export", tmp_path / "back")
    hidden, logits = outputs_diff(
        parity.load_hf(transformers.BertForMaskedLM, tmp_path / "back"), ours, parity.padded_batch
    )
    assert hidden < parity.TOL and logits < parity.TOL


def test_pretraining_heads_are_dropped_with_a_note(parity, tmp_path):
    hf_dir = parity.save_hf(transformers.BertForMaskedLM, bert_config(), tmp_path / "hf")
    weights = load_file(hf_dir / "model.safetensors")
    weights["bert.pooler.dense.weight"] = torch.zeros(32, 32)
    weights["cls.seq_relationship.weight"] = torch.zeros(2, 32)
    save_file(weights, hf_dir / "model.safetensors", metadata={"format": "pt"})
    result = from_hf(hf_dir, tmp_path / "export")
    notes = " ".join(result.notes)
    assert "bert.pooler.dense.weight" in notes and "cls.seq_relationship.weight" in notes
