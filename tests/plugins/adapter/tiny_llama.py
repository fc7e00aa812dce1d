"""The tiny Llama-like decoder the adapter tests share (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import torch

#: every linear a LoRA can target on it (the peft oracles use the same names)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "head"]


def llama(build, seed=0, n_kv_heads=2, **kwargs):
    """A tiny Llama-like decoder (GQA by default, SwiGLU, RoPE, untied head) with the same weights per seed."""
    torch.manual_seed(seed)
    return build(n_kv_heads=n_kv_heads, ffn="SwiGLU", norm="RMSNorm", position="RoPE", tie_embeddings=False,
                 **kwargs).eval()  # fmt: skip
