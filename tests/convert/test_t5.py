"""T5 import/export: relative position bias, unscaled scores, RMSNorm, ReLU MLP (v1.0) and gated GELU (v1.1)."""

from __future__ import annotations

import json

import pytest
import torch

from lightningllm.convert import ConversionError, from_hf, to_hf
from lightningllm.generation import generate
from lightningllm.io import load

transformers = pytest.importorskip("transformers")


def t5_config(**overrides):
    base = dict(
        vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, layer_norm_epsilon=1e-5,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return transformers.T5Config(**{**base, **overrides})


def save_t5(parity, path, *, untie: bool = False, **overrides):
    """A random T5ForConditionalGeneration; ``untie`` gives it an lm_head of its own (as v1.1 checkpoints have)."""
    model_class = transformers.T5ForConditionalGeneration
    config = t5_config(**overrides, **({"tie_word_embeddings": False} if untie else {}))  # v1.1: no scaling
    torch.manual_seed(0)
    config._attn_implementation = "eager"
    model = model_class(config).eval()
    with torch.no_grad():  # HF initialises norms to one: randomise them and the bias tables
        for name, parameter in model.named_parameters():
            if "norm" in name or "relative_attention_bias" in name:
                parameter.add_(torch.randn_like(parameter))
            if name.endswith((".q.weight", ".k.weight")):  # HF's tiny query/key init makes attention near uniform
                parameter.mul_(1.5)
        if untie:
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.3)
    model.save_pretrained(path)
    return path


def logits_diff(hf_model, ours, parity) -> float:
    """Max |HF - ours| of the logits, right-padded source batch (0, 3 and 5 pads), 9 decoder inputs."""
    src, mask = parity.padded_batch(side="right", length=30)  # 30 > max_distance: the far bucket is used
    decoder_ids = torch.randint(2, parity.VOCAB, (3, 9), generator=torch.Generator().manual_seed(4))
    decoder_ids[:, 0] = 0
    with torch.no_grad():
        theirs = hf_model(input_ids=src, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        mine = ours(src, decoder_ids, attention_mask=mask)
    assert theirs.shape == mine.shape
    return (theirs - mine).abs().max().item()


def greedy(hf_model, ours, parity, *, eos: int | None) -> tuple[list, list]:
    """20 greedy tokens from HF generate and from ours through decoder_for; with ``eos``, each row up to it."""
    src, mask = parity.padded_batch(seed=5, side="right")
    stop = {"eos_token_id": eos} if eos is not None else {"eos_token_id": None, "min_new_tokens": 20}
    with torch.no_grad():
        theirs = hf_model.generate(
            input_ids=src, attention_mask=mask, do_sample=False, max_new_tokens=20, pad_token_id=0, **stop
        )
    start = torch.full((src.shape[0], 1), ours.decoder_start_id)
    mine = generate(ours.decoder_for(src, mask), start, 20, temperature=0.0, eos_id=eos)

    def rows(out):  # drop the start token; cut after the first eos (HF pads finished rows with <pad>, we with eos)
        return [row[: row.index(eos) + 1] if eos in row else row for row in out[:, 1:].tolist()]

    return rows(theirs), rows(mine)


@pytest.mark.parametrize(
    "variant, overrides, untie",
    [
        ("v1.0", {"feed_forward_proj": "relu"}, False),  # tied head, scaled by d_model ** -0.5
        ("v1.1", {"feed_forward_proj": "gated-gelu"}, True),  # untied head, not scaled
    ],
)
def test_t5_matches_transformers_both_ways(parity, tmp_path, variant, overrides, untie):
    hf_dir = save_t5(parity, tmp_path / "hf", untie=untie, **overrides)
    result = from_hf(hf_dir, tmp_path / "export")
    ours, _ = load(tmp_path / "export")
    config = ours.config
    assert config["ffn"]["class_path"] == ("GLU" if untie else "MLP")
    assert config["tie_embeddings"] is (not untie) and config["scale_logits"] is (not untie)
    assert (
        config["position"]["init_args"]["bidirectional"]
        and not config["decoder_position"]["init_args"]["bidirectional"]
    )
    assert ours.n_encoder_layers == ours.n_layers == 2 and ours.decoder_start_id == 0
    assert "head_dim" not in config["attention"]["init_args"]  # d_kv == d_model // num_heads: the default width
    hf_model = parity.load_hf(transformers.T5ForConditionalGeneration, hf_dir)
    assert (hf_model.lm_head.weight is hf_model.shared.weight) is (not untie)  # HF sees the same tying
    diff = logits_diff(hf_model, ours, parity)
    assert diff < parity.TOL, f"import: max |logit diff| {diff}"

    theirs, mine = greedy(hf_model, ours, parity, eos=None)
    assert mine == theirs and all(len(row) == 20 for row in mine)
    eos = mine[0][4]  # a token row 0 emits early: stopping there, and padding the finished row, must agree too
    theirs, mine = greedy(hf_model, ours, parity, eos=eos)
    assert mine == theirs and len(mine[0]) <= 5

    to_hf(tmp_path / "export", tmp_path / "back")
    back = parity.load_hf(transformers.T5ForConditionalGeneration, tmp_path / "back")
    back_diff = logits_diff(back, ours, parity)
    assert back_diff < parity.TOL, f"export: max |logit diff| {back_diff}"
    assert not result.notes or all("tokenizer" in note for note in result.notes)


def test_t5_v1_1_wide_heads_match_transformers_both_ways(parity, tmp_path):
    """d_kv * num_heads != d_model, as in T5 v1.1 small (512, 6 x 64): here 4 heads of 16 in a width of 32."""
    hf_dir = save_t5(parity, tmp_path / "hf", untie=True, feed_forward_proj="gated-gelu", d_kv=16)
    from_hf(hf_dir, tmp_path / "export")
    ours, _ = load(tmp_path / "export")
    assert ours.config["attention"]["init_args"]["head_dim"] == 16
    for block in (*ours.encoder.blocks, *ours.decoder.blocks):
        assert block.attention.q_proj.weight.shape == (4 * 16, 32) and block.attention.o_proj.weight.shape == (32, 64)
    assert all(block.cross_attention.head_dim == 16 for block in ours.decoder.blocks)
    hf_model = parity.load_hf(transformers.T5ForConditionalGeneration, hf_dir)
    diff = logits_diff(hf_model, ours, parity)
    assert diff < parity.TOL, f"import: max |logit diff| {diff}"

    theirs, mine = greedy(hf_model, ours, parity, eos=None)
    assert mine == theirs and all(len(row) == 20 for row in mine)

    to_hf(tmp_path / "export", tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["d_model"], config["num_heads"], config["d_kv"]) == (32, 4, 16)
    back = parity.load_hf(transformers.T5ForConditionalGeneration, tmp_path / "back")
    back_diff = logits_diff(back, ours, parity)
    assert back_diff < parity.TOL, f"export: max |logit diff| {back_diff}"


def test_legacy_copies_and_old_config_spelling(parity, tmp_path):
    """A transformers 4 style folder: tie_word_embeddings=false for v1.1, stack embedding copies, the unused bias.

    Also a deeper decoder than encoder (HF's generate cannot run those, so only the logits are compared).
    """
    hf_dir = save_t5(parity, tmp_path / "hf", untie=True, feed_forward_proj="gated-gelu", num_decoder_layers=3)
    from safetensors.torch import load_file, save_file

    weights = load_file(hf_dir / "model.safetensors")
    weights["encoder.embed_tokens.weight"] = weights["shared.weight"].clone()
    weights["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(8, 4)
    save_file(weights, hf_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("scale_decoder_outputs")
    config.update(tie_word_embeddings=False, n_positions=64)
    (hf_dir / "config.json").write_text(json.dumps(config))
    result = from_hf(hf_dir, tmp_path / "export")
    ours, _ = load(tmp_path / "export")
    assert not ours.config["tie_embeddings"] and not ours.config["scale_logits"] and ours.max_seq_len == 64
    assert ours.n_encoder_layers == 2 and ours.n_layers == 3
    notes = " ".join(result.notes)
    assert "encoder.embed_tokens.weight" in notes and "EncDecAttention.relative_attention_bias" in notes
    diff = logits_diff(parity.load_hf(transformers.T5ForConditionalGeneration, hf_dir), ours, parity)
    assert diff < parity.TOL


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"feed_forward_proj": "gated-tanh"}, "feed_forward_proj='gated-tanh'"),
        ({"is_gated_act": False}, "is_gated_act=False"),
        ({"mystery": 1}, "mystery=1"),
    ],
)
def test_unsupported_fields_are_refused_by_name(parity, tmp_path, edit, match):
    hf_dir = save_t5(parity, tmp_path / "hf", feed_forward_proj="gated-gelu")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ConversionError, match=match):
        from_hf(hf_dir, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_converted_t5_fine_tunes(parity, tmp_path):
    from_hf(save_t5(parity, tmp_path / "hf", feed_forward_proj="gated-gelu"), tmp_path / "export")
    model, _ = load(tmp_path / "export")
    model.train()
    generator = torch.Generator().manual_seed(6)
    src = torch.randint(2, parity.VOCAB, (4, 10), generator=generator)
    labels = torch.randint(2, parity.VOCAB, (4, 6), generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        logits = model(src, model.shift_right(labels))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, parity.VOCAB), labels.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
