"""A headless Hugging Face BERT (BertModel weights) imports, matches transformers, classifies, exports headless."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from safetensors import safe_open

from lightningllm.convert import from_hf, to_hf
from lightningllm.io import load
from lightningllm.models import Encoder
from lightningllm.registry import get

transformers = pytest.importorskip("transformers")
TOL = 1e-4


@pytest.fixture
def bert_model_dir(tmp_path):
    """A tiny random BertModel (no MLM head), saved with save_pretrained."""
    config = transformers.BertConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-7,
    )  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():  # HF starts norms at one and biases at zero; randomise them so the test sees them
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, 96, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:], mask[2, 6:] = 0, 0  # right padding, as BERT tokenizers pad
    segments = (torch.arange(12) >= 5).long().expand(3, 12) * mask
    return ids, mask, segments


def last_hidden(hf_dir) -> torch.Tensor:
    hf = transformers.BertModel.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32).eval()
    ids, mask, segments = batch()
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, token_type_ids=segments).last_hidden_state


def test_bert_model_weights_convert_headless_and_match_the_last_hidden_state(bert_model_dir, tmp_path):
    result = from_hf(bert_model_dir, tmp_path / "export")
    assert any("pooler" in note for note in result.notes)
    ours, _ = load(tmp_path / "export")
    assert ours.config["head"]["class_path"] == "NoHead" and not any(n.startswith("head.") for n in ours.state_dict())
    ids, mask, segments = batch()
    with torch.no_grad():
        hidden = ours(ids, attention_mask=mask, segment_ids=segments)  # NoHead: the hidden states
    real = mask.bool()
    assert (hidden - last_hidden(bert_model_dir))[real].abs().max().item() < TOL


def test_export_back_to_hf_stays_headless(bert_model_dir, tmp_path):
    from_hf(bert_model_dir, tmp_path / "export")
    to_hf(tmp_path / "export", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == ["BertModel"]
    with safe_open(str(tmp_path / "back" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "embeddings.word_embeddings.weight" in names and not any(n.startswith(("cls.", "bert.")) for n in names)
    ids, mask, _ = batch()
    torch.testing.assert_close(last_hidden(tmp_path / "back"), last_hidden(bert_model_dir), rtol=0, atol=TOL)


def test_a_headless_bert_is_a_classification_backbone(bert_model_dir):
    torch.manual_seed(0)
    model = Encoder(
        vocab_size=96, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=64, n_segments=2,
        attention=partial(get("attention", "MultiHeadAttention"), bias=True),
        ffn=partial(get("ffn", "MLP"), activation="gelu", bias=True), norm=partial(get("norm", "LayerNorm"), eps=1e-7),
        position=get("position", "LearnedPosition"), block=get("block", "PostNorm"),
        head=partial(get("head", "ClassificationHead"), n_classes=3, pooling="first"), start_weights=bert_model_dir,
    ).eval()  # fmt: skip
    ids, mask, segments = batch()
    hidden = model.hidden_states(ids, attention_mask=mask, segment_ids=segments)
    assert (hidden - last_hidden(bert_model_dir))[mask.bool()].abs().max().item() < TOL
    logits = model(ids, attention_mask=mask, segment_ids=segments)
    torch.testing.assert_close(logits, model.head.proj(hidden[:, 0]))  # [CLS] pooling
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert model.head.proj.weight.grad.abs().sum() > 0 and model.blocks[0].attention.q_proj.weight.grad.abs().sum() > 0
