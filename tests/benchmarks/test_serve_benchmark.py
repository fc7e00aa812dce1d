"""Smoke run of benchmarks/serve.py: a row per server setting, the offline baseline, every answer equal to it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("litserve")
pytest.importorskip("openai")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve.py"


@pytest.mark.slow  # starts two servers
def test_quick_run_prints_latency_throughput_and_ratios(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--export", str(tmp_path / "none"), "--requests", "4", "--max_tokens", "8"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"server, batch (\d+) .* answers equal to offline greedy: (\d+)/(\d+)", done.stdout)
    assert rows == [("1", "4", "4"), ("8", "4", "4")], done.stdout
    assert "offline generate, batch 8" in done.stdout and "throughput, batch 8 / batch 1:" in done.stdout
