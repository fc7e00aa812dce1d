"""Llama (Touvron et al., 2023): RoPE, RMSNorm, SwiGLU, grouped-query attention, RoPE scaling."""

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
from lightningllm.convert.table import Family, Field, Ignored

GATED_MLP = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}

LLAMA = Family(
    model_type="llama",
    architecture="LlamaForCausalLM",
    model=DECODER,
    skeleton={
        "attention": {"class_path": "MultiHeadAttention", "init_args": {}},
        "norm": {"class_path": "RMSNorm", "init_args": {}},
        "position": {"class_path": "RoPE", "init_args": {}},
        "block": PRE_NORM,
        "dropout": 0.0,
        "scale_logits": False,
    },
    fields=(
        *COMMON,
        *llama_fields(rms_norm_eps=1e-6, default_theta=10000.0, tie=False),
        Field("attention_bias", "attention.init_args.bias", False),
        gated_ffn_rule("ffn", bias_field="mlp_bias"),
        Ignored("pretraining_tp", "tensor-parallel slicing of the same matmuls in Meta's training code"),
    ),
    weights=llama_weights(gated_mlp_weights("model.layers.{i}.mlp", "blocks.{i}.ffn", GATED_MLP)),
    hf_prefix="model.",
)
