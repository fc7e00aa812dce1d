"""Mistral 7B (Jiang et al., 2023): Llama's layout with sliding-window attention."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightningllm.convert.families.common import (
    COMMON,
    DECODER,
    PRE_NORM,
    gated_ffn_rule,
    gated_mlp_weights,
    llama_fields,
    llama_weights,
)
from lightningllm.convert.families.llama import GATED_MLP
from lightningllm.convert.table import Family, Rule, Unsupported


def sliding_window_rule(default: int | None) -> Rule:
    """``sliding_window`` W -> SlidingWindowAttention(window=W); None -> full causal attention.

    HF's mask lets query ``i`` see key ``j`` when ``i - W < j <= i`` (``sliding_window_overlay``): the
    query itself and the W - 1 previous keys, which is exactly our ``|i - j| < window`` under the
    causal mask.
    """

    def read(hf: Mapping[str, Any]) -> dict[str, Any]:
        window = hf.get("sliding_window", default)
        if window is None:
            return {"attention": {"class_path": "MultiHeadAttention", "init_args": {}}}
        return {"attention": {"class_path": "SlidingWindowAttention", "init_args": {"window": int(window)}}}

    def write(ours: Mapping[str, Any]) -> dict[str, Any]:
        attention = ours["attention"]
        if attention["class_path"] == "MultiHeadAttention":
            return {"sliding_window": None}
        args = attention["init_args"]
        if attention["class_path"] != "SlidingWindowAttention" or args["global_tokens"] or args["block_size"]:
            raise Unsupported(f"attention {attention['class_path']} {args} (only a plain sliding window)")
        return {"sliding_window": args["window"]}

    return Rule(("sliding_window",), read, write)


MISTRAL = Family(
    model_type="mistral",
    architecture="MistralForCausalLM",
    model=DECODER,
    skeleton={
        "norm": {"class_path": "RMSNorm", "init_args": {}},
        "position": {"class_path": "RoPE", "init_args": {}},
        "block": PRE_NORM,
        "dropout": 0.0,
        "scale_logits": False,
    },
    fields=(
        *COMMON,
        *llama_fields(rms_norm_eps=1e-6, default_theta=10000.0, tie=False),
        sliding_window_rule(default=4096),
        gated_ffn_rule("ffn", bias_field=None),
    ),
    weights=llama_weights(gated_mlp_weights("model.layers.{i}.mlp", "blocks.{i}.ffn", GATED_MLP)),
    hf_prefix="model.",
)
