"""Mixtral 8x7B (Jiang et al., 2024): Mistral with a top-2 mixture of SwiGLU experts in every layer."""

from __future__ import annotations

from lightningllm.convert.families.common import (
    COMMON,
    DECODER,
    PRE_NORM,
    gated_ffn_rule,
    gated_mlp_weights,
    llama_fields,
    llama_weights,
)
from lightningllm.convert.families.mistral import sliding_window_rule
from lightningllm.convert.table import Family, Field, Fixed, Rule, Weight

EXPERT = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}

# HF adds router_aux_loss_coef * balance loss only when output_router_logits; ours adds aux_loss_weight * its own.
AUX_LOSS = Rule(
    ("router_aux_loss_coef", "output_router_logits"),
    lambda hf: {
        "ffn.init_args.aux_loss_weight": float(hf.get("router_aux_loss_coef", 0.001))
        if hf.get("output_router_logits", False)
        else 0.0
    },
    lambda ours: {
        "output_router_logits": ours["ffn"]["init_args"]["aux_loss_weight"] > 0,
        "router_aux_loss_coef": ours["ffn"]["init_args"]["aux_loss_weight"] or 0.001,
    },
)

MIXTRAL = Family(
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    model=DECODER,
    skeleton={
        "norm": {"class_path": "RMSNorm", "init_args": {}},
        "position": {"class_path": "RoPE", "init_args": {}},
        "block": PRE_NORM,
        # HF's Mixtral never drops a token, and normalises the top-k weights to sum to one
        "ffn": {
            "class_path": "MixtureOfExperts",
            "init_args": {"capacity_factor": None, "normalize_top_k": True, "z_loss_weight": 0.0},
        },
        "dropout": 0.0,
        "scale_logits": False,
    },
    fields=(
        *COMMON,
        *llama_fields(rms_norm_eps=1e-5, default_theta=1e6, tie=False),
        sliding_window_rule(default=None),
        gated_ffn_rule("ffn.init_args.expert", bias_field=None),
        Field("num_local_experts", "ffn.init_args.n_experts", 8),
        Field("num_experts_per_tok", "ffn.init_args.top_k", 2),
        AUX_LOSS,
        Fixed("router_jitter_noise", 0.0, "our router multiplies no noise into its inputs in training"),
    ),
    weights=llama_weights(
        (
            Weight("model.layers.{i}.block_sparse_moe.gate.weight", "blocks.{i}.ffn.router.weight"),
            *gated_mlp_weights("model.layers.{i}.block_sparse_moe.experts.{e}", "blocks.{i}.ffn.experts.{e}", EXPERT),
        )
    ),
    hf_prefix="model.",
)
