"""Smoke run of benchmarks/decode.py on a tiny Llama: every contender writes Hugging Face's greedy tokens."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode.py"


def test_tiny_run_prints_a_table_where_every_contender_agrees_with_hugging_face(tmp_path: Path) -> None:
    tiny = ["--vocab_size", "97", "--dim", "32", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2",
            "--hidden_dim", "64", "--prompt_len", "5", "--new_tokens", "6", "--rounds", "1", "--batch_sizes", "1", "3",
            "--no-compile"]  # fmt: skip
    done = subprocess.run([sys.executable, str(SCRIPT), *tiny], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("  hugging", "  plain", "  light"))]
    table = [row for row in rows if row[-1] in ("yes", "NO")]
    assert len(table) == 6 and all(row[-1] == "yes" for row in table), done.stdout  # 3 contenders x 2 batch sizes
    assert done.stdout.count("lightningllm / hugging face:") == 2
    assert done.stdout.count("weight floor") == 2  # the bound every contender is read against
