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


def write_run_config(
    tmp_path,
    *,
    task: str,
    model_class: str,
    model: dict,
    corpus,
    data: dict | None = None,
    name: str = "run.yaml",
):
    """A small `lightningllm fit` YAML: the given task and model on ``corpus`` with CharTokenizer,
    40 steps, validation every 20, CSV logs under ``tmp_path/run`` and an export to ``tmp_path/export``."""
    import yaml

    config = {
        "seed_everything": 0,
        "model": {
            "class_path": task,
            "init_args": {
                "model": {"class_path": model_class, "init_args": model},
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}},
                "warmup_steps": 5,
            },
        },
        "data": {
            "class_path": "lightningllm.data.TextDataModule",
            "init_args": {
                "corpus": str(corpus), "tokenizer": {"class_path": "CharTokenizer"}, "seq_len": 32,
                "batch_size": 8, "data_dir": str(tmp_path / "cache"), **(data or {}),
            },
        },
        "trainer": {
            "max_steps": 40, "val_check_interval": 20, "limit_val_batches": 4, "check_val_every_n_epoch": None,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path / "run"),
            "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path / "run")}},
            "callbacks": [{"class_path": "Export", "init_args": {"dirpath": str(tmp_path / "export")}}],
        },
    }  # fmt: skip
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def run_config():
    return write_run_config
