"""Shared fixtures: tiny models built from registered plugins, on CPU."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from lightningllm.models import Decoder
from lightningllm.registry import get

torch.set_num_threads(1)  # pytest-xdist runs one worker per core


def build_decoder(
    *,
    vocab_size: int = 50,
    dim: int = 32,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    attention: str = "MultiHeadAttention",
    ffn: str = "MLP",
    norm: str = "LayerNorm",
    position: str = "LearnedPosition",
    block: str = "PreNorm",
    max_seq_len: int = 64,
    **kwargs,
) -> Decoder:
    """A tiny Decoder from registered plugin names (knobs through functools.partial if needed)."""

    def factory(kind: str, spec):
        return spec if callable(spec) else get(kind, spec)

    return Decoder(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        attention=factory("attention", attention),
        ffn=factory("ffn", ffn),
        norm=factory("norm", norm),
        position=factory("position", position),
        block=factory("block", block),
        max_seq_len=max_seq_len,
        **kwargs,
    )


@pytest.fixture
def decoder_factory():
    return build_decoder


@pytest.fixture
def llama_like():
    return build_decoder(
        n_kv_heads=2,
        ffn="SwiGLU",
        norm="RMSNorm",
        position=partial(get("position", "RoPE"), base=500.0),
        tie_embeddings=False,
    )
