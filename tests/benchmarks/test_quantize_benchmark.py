"""benchmarks/quantize.py's table: ratios to fp32, and the flag on a perplexity rise above the threshold."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "quantize.py"


def _bench():
    spec = importlib.util.spec_from_file_location("quantize_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_table_gives_ratios_and_flags_a_rise_above_the_threshold():
    bench = _bench()
    rows = [
        bench.Row("fp32", 4.0, 8_000_000, 7_000_000, [100.0, 120.0, 110.0]),
        bench.Row("int8", 4.1, 2_000_000, 1_750_000, [55.0, 50.0, 60.0]),
        bench.Row("int4", 4.4, 1_400_000, 1_050_000, [20.0, 22.0, 21.0]),
    ]
    lines = bench.table(rows, threshold=0.05, threads=1).splitlines()
    int8, int4 = (next(line for line in lines if line.startswith(f"| {name} |")) for name in ("int8", "int4"))
    assert "+2.50%" in int8 and "0.250x" in int8 and "0.50x" in int8 and "PERPLEXITY" not in int8
    assert "+10.00%" in int4 and "0.150x" in int4 and "PERPLEXITY +10.0% > 5%" in int4
