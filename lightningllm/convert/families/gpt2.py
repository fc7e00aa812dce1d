"""GPT-2 (Radford et al., 2019): learned positions, pre-norm LayerNorm, GELU MLP, biases everywhere."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightningllm.convert.families.common import ACTIVATIONS, COMMON, DECODER, PRE_NORM
from lightningllm.convert.table import Family, Field, Fixed, Ignored, Rule, Unsupported, Weight, choice

_act_to_ours, _act_to_hf = choice(ACTIVATIONS, "activation_function")


def _dropout_read(hf: Mapping[str, Any]) -> dict[str, Any]:
    resid, embd = hf.get("resid_pdrop", 0.1), hf.get("embd_pdrop", 0.1)
    if resid != embd:
        raise Unsupported(
            f"embd_pdrop={embd} with resid_pdrop={resid} (our Decoder has one dropout for embeddings and residuals)"
        )
    return {"dropout": resid}


GPT2 = Family(
    model_type="gpt2",
    architecture="GPT2LMHeadModel",
    model=DECODER,
    skeleton={
        "attention": {"class_path": "MultiHeadAttention", "init_args": {"bias": True}},
        "ffn": {"class_path": "MLP", "init_args": {"bias": True}},
        "norm": {"class_path": "LayerNorm", "init_args": {}},
        "position": {"class_path": "LearnedPosition", "init_args": {}},
        "block": PRE_NORM,
        "scale_logits": False,
    },
    fields=(
        *COMMON,
        Field("vocab_size", "vocab_size", 50257),
        Field("n_embd", "dim", 768),
        Field("n_layer", "n_layers", 12),
        Field("n_head", "n_heads", 12),
        Rule((), lambda hf: {"n_kv_heads": hf.get("n_head", 12)}, lambda ours: {}),
        Rule(
            ("n_inner",),
            lambda hf: {"hidden_dim": hf.get("n_inner") or 4 * hf.get("n_embd", 768)},
            lambda ours: {"n_inner": ours["hidden_dim"]},
        ),
        Field("n_positions", "max_seq_len", 1024),
        Field("activation_function", "ffn.init_args.activation", "gelu_new", _act_to_ours, _act_to_hf),
        Field("layer_norm_epsilon", "norm.init_args.eps", 1e-5),
        Field("attn_pdrop", "attention_dropout", 0.1),
        Rule(
            ("resid_pdrop", "embd_pdrop"),
            _dropout_read,
            lambda ours: {"resid_pdrop": ours["dropout"], "embd_pdrop": ours["dropout"]},
        ),
        Field("tie_word_embeddings", "tie_embeddings", True),
        Field("initializer_range", "init_std", 0.02),
        Fixed("scale_attn_weights", True, "our attention always scales scores by 1/sqrt(head_dim)"),
        Fixed("scale_attn_by_inverse_layer_idx", False, "our attention scales every layer alike"),
        Fixed("add_cross_attention", False, "a decoder-only model has no cross-attention"),
        Ignored("reorder_and_upcast_attn", "computes the same scores in float32 for fp16 stability"),
        *(
            Ignored(name, "configures the multiple-choice head of GPT2DoubleHeadsModel, which is not converted")
            for name in (
                "summary_type",
                "summary_use_proj",
                "summary_activation",
                "summary_proj_to_labels",
                "summary_first_dropout",
            )
        ),
    ),
    weights=(
        Weight("transformer.wte.weight", "embed.weight"),
        Weight("transformer.wpe.weight", "position.table.weight"),
        # Conv1D stores (in, out); c_attn is q, k and v side by side
        Weight(
            "transformer.h.{i}.attn.c_attn.weight",
            tuple(f"blocks.{{i}}.attention.{p}_proj.weight" for p in "qkv"),
            transpose=True,
        ),
        Weight("transformer.h.{i}.attn.c_attn.bias", tuple(f"blocks.{{i}}.attention.{p}_proj.bias" for p in "qkv")),
        Weight("transformer.h.{i}.attn.c_proj.weight", "blocks.{i}.attention.o_proj.weight", transpose=True),
        Weight("transformer.h.{i}.attn.c_proj.bias", "blocks.{i}.attention.o_proj.bias"),
        Weight("transformer.h.{i}.ln_1.weight", "blocks.{i}.norm_1.weight"),
        Weight("transformer.h.{i}.ln_1.bias", "blocks.{i}.norm_1.bias"),
        Weight("transformer.h.{i}.ln_2.weight", "blocks.{i}.norm_2.weight"),
        Weight("transformer.h.{i}.ln_2.bias", "blocks.{i}.norm_2.bias"),
        Weight("transformer.h.{i}.mlp.c_fc.weight", "blocks.{i}.ffn.up_proj.weight", transpose=True),
        Weight("transformer.h.{i}.mlp.c_fc.bias", "blocks.{i}.ffn.up_proj.bias"),
        Weight("transformer.h.{i}.mlp.c_proj.weight", "blocks.{i}.ffn.down_proj.weight", transpose=True),
        Weight("transformer.h.{i}.mlp.c_proj.bias", "blocks.{i}.ffn.down_proj.bias"),
        Weight("transformer.ln_f.weight", "norm.weight"),
        Weight("transformer.ln_f.bias", "norm.bias"),
        Weight("lm_head.weight", "head.weight"),
    ),
    hf_prefix="transformer.",
    ignored_weights={
        r"^transformer\.h\.\d+\.attn\.(masked_)?bias$": "the causal-mask buffers of older GPT-2 checkpoints",
        r"^multiple_choice_head\.": "the multiple-choice head of GPT2DoubleHeadsModel (not converted)",
    },
)
