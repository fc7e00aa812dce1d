"""Smoke run of benchmarks/attention_scaling.py: table rows for every attention plugin and a valid PNG."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightningllm.registry import available

pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "attention_scaling.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_run_prints_table_and_writes_png(tmp_path: Path) -> None:
    out = tmp_path / "plots" / "scaling.png"  # the folder does not exist yet: the script creates it
    # a fresh interpreter: the script forks its workers, which needs a process that has run no tensor ops
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--seq_lens", "32", "64", "2048", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    plugins = available("attention")
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| T |"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["T"] + [
        f"{n} {unit}" for n in plugins for unit in ("ms", "MiB")
    ]
    rows = [line for line in lines if re.match(r"\| \d+ \|", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["32", "64"]  # --quick drops T > 1024
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert len(cells) == 2 * len(plugins)
        times, memories = [float(c) for c in cells[0::2]], [float(c) for c in cells[1::2]]  # "failed" raises
        assert all(t > 0 for t in times) and all(m >= 0 for m in memories), row
    for n in plugins:
        assert re.search(rf"- {n}: memory exponent -?\d+\.\d\d, time exponent -?\d+\.\d\d", done.stdout)
    assert out.read_bytes()[:8] == PNG_MAGIC
