"""benchmarks/train_mfu.py: the FLOPs per token against the model's own matmul weights, and a tiny CPU run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from torch import nn

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_mfu.py"
spec = importlib.util.spec_from_file_location("train_mfu", SCRIPT)
train_mfu = sys.modules.setdefault("train_mfu", importlib.util.module_from_spec(spec))
spec.loader.exec_module(train_mfu)


def test_flops_per_token_is_six_times_the_matmul_weights_plus_attention():
    shape, seq_len = train_mfu.SHAPES["tiny"], 32
    model = train_mfu.lightningllm_model(shape, seq_len)
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    layers, dim = shape[2], shape[1]
    assert train_mfu.flops_per_token(shape, seq_len) == 6 * matmul_weights + 12 * layers * dim * seq_len


def test_a_tiny_cpu_run_prints_tokens_per_second_and_mfu(tmp_path):
    args = ["--shape", "tiny", "--device", "cpu", "--seq_len", "16", "--batch_size", "2", "--warmup", "2",
            "--steps", "2", "--no-compile"]  # fmt: skip
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    ours = next(line for line in done.stdout.splitlines() if line.strip().startswith("lightningllm "))
    assert float(ours.split()[1]) > 0 and "MFU" in ours
    assert "litgpt" in done.stdout
