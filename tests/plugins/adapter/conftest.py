"""Fixtures of the adapter tests: a tiny CausalLM run written as YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

TEXT = "\n\n".join(f"ACT {i}. To be, or not to be, that is the question: whether 'tis nobler {i}." for i in range(30))


@pytest.fixture
def adapter_run(run_config):
    """adapter_run(tmp_path, transforms, steps): a tiny Decoder + CausalLM run with ``transforms``, exported."""

    def write(tmp_path: Path, transforms: list[dict], steps: int = 2) -> Path:
        corpus = tmp_path / "corpus"
        corpus.mkdir(exist_ok=True)
        (corpus / "doc.txt").write_text(TEXT)
        model = {
            "dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32, "tie_embeddings": False,
            "attention": {"class_path": "MultiHeadAttention"}, "ffn": {"class_path": "SwiGLU"},
            "norm": {"class_path": "RMSNorm"}, "position": {"class_path": "RoPE"},
            "block": {"class_path": "PreNorm"}, "transforms": transforms,
        }  # fmt: skip
        path = run_config(tmp_path, task="lightningllm.tasks.CausalLM", model_class="lightningllm.models.Decoder",
                          model=model, corpus=corpus)  # fmt: skip
        text = path.read_text().replace("max_steps: 40", f"max_steps: {steps}")
        path.write_text(text.replace("val_check_interval: 20", f"val_check_interval: {steps}"))
        return path

    return write
