"""Fixtures of the lifecycle tests: a tiny CausalLM run written as YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

TEXT = "\n\n".join(f"ACT {i}. To be, or not to be, that is the question: whether 'tis nobler {i}." for i in range(30))


@pytest.fixture
def write_run(run_config):
    """write_run(tmp_path, **model_overrides): a tiny Decoder + CausalLM run (40 steps) on a small corpus."""

    def write(tmp_path: Path, **model_overrides) -> Path:
        corpus = tmp_path / "corpus"
        corpus.mkdir(exist_ok=True)
        for i in range(3):
            (corpus / f"doc{i}.txt").write_text(TEXT)
        model = {
            "dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32,
            "attention": {"class_path": "MultiHeadAttention"}, "ffn": {"class_path": "MLP"},
            "norm": {"class_path": "LayerNorm"}, "position": {"class_path": "LearnedPosition"},
            "block": {"class_path": "PreNorm"}, **model_overrides,
        }  # fmt: skip
        return run_config(
            tmp_path, task="lightningllm.tasks.CausalLM", model_class="lightningllm.models.Decoder", model=model,
            corpus=corpus,
        )  # fmt: skip

    return write
