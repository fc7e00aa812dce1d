"""Weight-only quantisation of an export: perplexity on the held-out plays, size on disk and decode speed.

For each configuration (fp32, and the ``lightningllm quantize`` settings below) it writes the quantised export under
``--out``, then reports

- the perplexity of the ``shakespeare_perplexity`` lm-eval task (passages of the held-out plays; byte perplexity,
  which for a character-level model is the perplexity per character), and its rise over fp32, flagged when it is
  above ``--threshold`` (5% by default);
- the size of ``model.safetensors``, and of the quantised linear layers' tensors alone (the embeddings and the
  head stay in floating point), each as a ratio to fp32;
- decode speed: ``lightningllm.generation.generate``, batch 1, ``--tokens`` new tokens, greedy, timed in
  ``--rounds`` rounds that alternate the configurations (so a busy machine slows them alike); the median.

Run it from a folder whose ``.cache/lightningllm`` holds the Shakespeare corpus (the evaluation task reads it):

    python benchmarks/quantize.py --export runs/shakespeare-char/export --out /tmp/quantize-bench

The markdown table goes to ``--out/quantize.md`` and is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

from lightningllm.evaluation.command import evaluate_export  # noqa: E402
from lightningllm.generation import generate  # noqa: E402
from lightningllm.io import WEIGHTS_FILE, load  # noqa: E402
from lightningllm.quantize_command import quantize_export  # noqa: E402
from lightningllm.registry import load_plugins  # noqa: E402

#: name -> (bits, group_size); None: the float export itself
CONFIGS = {"fp32": None, "int8": (8, None), "int8-g32": (8, 32), "int4-g32": (4, 32), "int4": (4, None)}
QUANTISED_PARTS = ("weight_qdata", "weight_scale", "weight_zero_point")


@dataclass
class Row:
    name: str
    perplexity: float
    file_bytes: int
    linear_bytes: int
    tokens_per_s: list[float]


def tensor_bytes(path: Path) -> dict[str, int]:
    """{tensor name: bytes} from a safetensors header."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return {name: meta["data_offsets"][1] - meta["data_offsets"][0] for name, meta in header.items()
            if name != "__metadata__"}  # fmt: skip


def linear_bytes(path: Path, quantised_layers: list[str]) -> int:
    """Bytes of the weights of ``quantised_layers`` in the file (float weights, or the quantised tensors)."""
    sizes = tensor_bytes(path)
    names = [f"{layer}.{part}" for layer in quantised_layers for part in ("weight", *QUANTISED_PARTS)]
    return sum(sizes.get(name, 0) for name in names)


def perplexity(export: Path, n: int) -> float:
    results = evaluate_export(str(export), tasks=["shakespeare_perplexity"], n=n, batch_size=16)
    return results["results"]["shakespeare_perplexity"]["byte_perplexity,none"]


def tokens_per_second(export: Path, prompt: str, tokens: int) -> float:
    model, tokenizer = load(export)
    ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(prompt)]])
    generate(model, ids, 8, temperature=0.0)  # warm-up
    start = time.perf_counter()
    generate(model, ids, tokens, temperature=0.0)
    return tokens / (time.perf_counter() - start)


def table(rows: list[Row], threshold: float, threads: int) -> str:
    base = rows[0]
    lines = [
        f"Decode: batch 1, greedy, median of {len(base.tokens_per_s)} alternating rounds, {threads} CPU thread(s). "
        f"Flag: perplexity more than {threshold:.0%} above fp32.",
        "",
        "| config | perplexity (byte) | vs fp32 | model.safetensors | vs fp32 | quantised linears | vs fp32 | "
        "decode tok/s | vs fp32 | flag |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        rise = row.perplexity / base.perplexity - 1
        speed, base_speed = statistics.median(row.tokens_per_s), statistics.median(base.tokens_per_s)
        flag = f"PERPLEXITY +{rise:.1%} > {threshold:.0%}" if rise > threshold else ""
        lines.append(
            f"| {row.name} | {row.perplexity:.3f} | {rise:+.2%} | {row.file_bytes / 1e6:.2f} MB | "
            f"{row.file_bytes / base.file_bytes:.3f}x | {row.linear_bytes / 1e6:.2f} MB | "
            f"{row.linear_bytes / base.linear_bytes:.3f}x | {speed:.1f} | {speed / base_speed:.2f}x | {flag} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, default=ROOT / "runs" / "shakespeare-char" / "export")
    parser.add_argument("--out", type=Path, default=Path("/tmp/lightningllm-quantize-bench"))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--n", type=int, default=200, help="Perplexity passages (the task's n).")
    parser.add_argument("--threshold", type=float, default=0.05, help="Flag a perplexity rise above this fraction.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine).")
    parser.add_argument("--prompt", default="ROMEO:\n")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_plugins()
    names = ["fp32", *[name for name in args.configs if name != "fp32"]]
    exports = {"fp32": args.export}
    for name in names[1:]:
        bits, group_size = CONFIGS[name]
        exports[name] = quantize_export(str(args.export), str(args.out / name), bits=bits, group_size=group_size)
    quantised_model, _ = load(exports[names[-1]])
    layers = [n for n, m in quantised_model.named_modules() if type(m).__name__ == "WeightOnlyQuantizedLinear"]
    speeds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            speeds[name].append(tokens_per_second(exports[name], args.prompt, args.tokens))
    rows = [
        Row(name, perplexity(exports[name], args.n), (exports[name] / WEIGHTS_FILE).stat().st_size,
            linear_bytes(exports[name] / WEIGHTS_FILE, layers), speeds[name])
        for name in names
    ]  # fmt: skip
    report = table(rows, args.threshold, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantize.md").write_text(report)
    sys.stdout.write(report)


if __name__ == "__main__":
    main()
