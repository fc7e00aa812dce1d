"""Llama import/export: RoPE (plain, linear, llama3 scaling), RMSNorm, SwiGLU, GQA, biases, tied head; fine-tuning."""

from __future__ import annotations

import json
import math

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


#: Llama 3.1 scaling shrunk to a tiny model: head_dim 8 at base 100 has wavelengths 6.3, 20, 63 and 200, so with
#: an original length of 32 one channel is kept (< 32 / 4), one interpolated and two divided by the factor.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 100.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip


def llama3_config(rope=LLAMA3_ROPE, **overrides):
    """Weights 5x HF's default scale, so attention is sharp enough that RoPE moves the logits well above 1e-4."""
    return llama_config(rope_parameters=rope, initializer_range=0.1, **overrides)


def test_llama3_rope_matches_transformers(parity, tmp_path):
    diffs = parity.check_decoder(transformers.LlamaForCausalLM, llama3_config(), tmp_path)
    assert max(diffs.values()) < parity.TOL
    model, _ = load(tmp_path / "export")
    assert model.config["position"]["init_args"] == {
        "base": 100.0, "scaling": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_seq_len": 32,
    }  # fmt: skip
    back = transformers.AutoConfig.from_pretrained(tmp_path / "back")
    assert {key: back.rope_parameters[key] for key in LLAMA3_ROPE} == LLAMA3_ROPE


def test_llama3_scaling_changes_the_logits(parity, tmp_path):
    """The same weights with unscaled RoPE give other logits: the parity above is not blind to the scaling."""
    scaled = parity.save_hf(transformers.LlamaForCausalLM, llama3_config(), tmp_path / "a")
    plain_rope = {"rope_type": "default", "rope_theta": 100.0}
    plain = parity.save_hf(transformers.LlamaForCausalLM, llama3_config(plain_rope), tmp_path / "b")
    from_hf(scaled, tmp_path / "export")
    ours, _ = load(tmp_path / "export")
    ids, mask = parity.padded_batch()
    assert parity.decoder_logit_diff(parity.load_hf(transformers.LlamaForCausalLM, plain), ours, ids, mask) > 1e-2
    hf_scaled = parity.load_hf(transformers.LlamaForCausalLM, scaled)
    assert parity.decoder_logit_diff(hf_scaled, ours, ids, mask) < parity.TOL


def test_llama3_from_old_rope_scaling_spelling(parity, tmp_path):
    """Llama 3.1's own config.json: ``rope_theta`` at the top and ``rope_scaling`` holding the llama3 knobs."""
    hf_dir = parity.save_hf(transformers.LlamaForCausalLM, llama3_config(), tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (hf_dir / "config.json").write_text(json.dumps(config))
    from_hf(hf_dir, tmp_path / "export")
    ours, _ = load(tmp_path / "export")
    assert ours.config["position"]["init_args"]["original_max_seq_len"] == 32
    ids, mask = parity.padded_batch()
    assert parity.decoder_logit_diff(parity.load_hf(transformers.LlamaForCausalLM, hf_dir), ours, ids, mask) < 1e-4


#: YaRN on the same tiny model: with an original length of 32 the ramp runs over channels 0 to 2 of 4, and
#: factor 8 multiplies cos and sin by 0.1 ln 8 + 1 (or, with DeepSeek's mscale knobs, their ratio).
YARN_ROPE = {"rope_type": "yarn", "factor": 8.0, "rope_theta": 100.0, "original_max_position_embeddings": 32}
YARN_KNOBS = {"beta_fast": 16.0, "beta_slow": 2.0, "truncate": False, "mscale": 1.0, "mscale_all_dim": 0.5}


@pytest.mark.parametrize("extra", [{}, YARN_KNOBS], ids=["defaults", "betas-mscale-untruncated"])
def test_yarn_rope_matches_transformers(parity, tmp_path, extra):
    rope = {**YARN_ROPE, **extra}
    # max_position_embeddings = factor * original length, as HF's yarn validation expects
    parity.check_decoder(transformers.LlamaForCausalLM, llama3_config(rope, max_position_embeddings=256), tmp_path)
    model, _ = load(tmp_path / "export")
    args = model.config["position"]["init_args"]
    assert args["scaling"] == "yarn" and args["original_max_seq_len"] == 32
    if extra:  # DeepSeek's mscale pair became the attention factor HF derives from it
        assert args["attention_factor"] == pytest.approx((0.1 * math.log(8) + 1) / (0.05 * math.log(8) + 1))
        assert (args["beta_fast"], args["beta_slow"], args["truncate"]) == (16.0, 2.0, False)
    ids, mask = parity.padded_batch()
    plain = parity.save_hf(transformers.LlamaForCausalLM, llama3_config({"rope_theta": 100.0}), tmp_path / "plain")
    assert parity.decoder_logit_diff(parity.load_hf(transformers.LlamaForCausalLM, plain), model, ids, mask) > 1e-2


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        {"rope_type": "longrope", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16,
         "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
    ],
    ids=["dynamic", "longrope"],
)  # fmt: skip
def test_other_rope_types_are_refused_by_name(parity, tmp_path, rope):
    hf_dir = parity.save_hf(transformers.LlamaForCausalLM, llama_config(rope_parameters=rope), tmp_path / "hf")
    with pytest.raises(ConversionError, match=f"rope_type='{rope['rope_type']}'"):
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


@pytest.mark.parametrize(
    "legacy, refused",
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, False),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 10000.0}, False),
        ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, True),
        ({"rope_theta": 500000.0}, True),
    ],
)
def test_rope_parameters_and_a_disagreeing_legacy_rope_scaling_are_refused_naming_both(legacy, refused):
    from lightningllm.convert.families import FAMILIES
    from lightningllm.convert.hf import our_config
    from lightningllm.convert.table import ConversionError

    hf = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 4, "intermediate_size": 64,
          "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, **legacy}  # fmt: skip
    if not refused:
        assert our_config(FAMILIES["llama"], hf, source="x")["position"]["init_args"]["factor"] == 2.0
        return
    with pytest.raises(ConversionError, match=r"rope_parameters=.*rope_scaling=.*disagree"):
        our_config(FAMILIES["llama"], hf, source="x")


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"])
def test_a_config_without_a_shape_field_is_refused_naming_it(field):
    from lightningllm.convert.families import FAMILIES
    from lightningllm.convert.hf import our_config
    from lightningllm.convert.table import ConversionError

    hf = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 4, "intermediate_size": 64}  # fmt: skip
    del hf[field]
    with pytest.raises(ConversionError, match=field):
        our_config(FAMILIES["llama"], hf, source="x")
