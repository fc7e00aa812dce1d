"""Several exports on the same lm-evaluation-harness tasks, one markdown table: how pretraining, fine-tuning and
alignment move the bundled Shakespeare scores (or any local task directory's).

Each export runs through ``lightningllm.evaluation.command.evaluate_export`` (what ``lightningllm evaluate`` runs),
so the figures are the command's; ``make finetune-demo`` and ``make rlhf-demo`` end with it.

    python benchmarks/evaluate_exports.py pretrained=runs/shakespeare-char/export sft=runs/sft-shakespeare/export \
        --out runs/sft-shakespeare/evaluation.md

Rows: task and metric (accuracy for the multiple-choice tasks, bits per byte for perplexity; lower is better
there); columns: the exports in the order given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightningllm.atomic import atomic_file
from lightningllm.evaluation.command import evaluate_export, metric_values

#: per task, the metrics the table keeps (any other task keeps all of its metrics)
KEPT = {"acc", "acc_norm", "bits_per_byte", "exact_match"}


def scores(results: dict) -> dict[tuple[str, str], float]:
    """{(task, metric): value} from lm-eval's results, stderr entries and unkept metrics left out."""
    return {(task, metric): value for task, metric, value in metric_values(results) if metric in KEPT}


def markdown(columns: dict[str, dict[tuple[str, str], float]]) -> str:
    """One row per (task, metric) any export has, one column per export ("n/a" where an export lacks it)."""
    rows = sorted({row for table in columns.values() for row in table})
    lines = ["| task | metric | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for task, metric in rows:
        cells = [f"{table[task, metric]:.3f}" if (task, metric) in table else "n/a" for table in columns.values()]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", help="name=EXPORT_DIR, one per column")
    parser.add_argument("--tasks", nargs="+", default=None, help="task names (default: every bundled task)")
    parser.add_argument("--include_path", default=None, help="a local lm-eval task directory")
    parser.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    args = parser.parse_args(argv)
    pairs = [item.partition("=") for item in args.exports]
    if any(not sep or not name or not path for name, sep, path in pairs):
        parser.error(f"exports are name=EXPORT_DIR pairs; got {' '.join(args.exports)}")
    columns = {}
    for name, _, path in pairs:
        print(f"evaluating {name} ({path})", file=sys.stderr, flush=True)
        columns[name] = scores(evaluate_export(path, args.tasks, args.include_path, args.limit))
    table = markdown(columns)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(args.out) as staged:
            Path(staged).write_text(table)
    print(table)
    return table


if __name__ == "__main__":
    main()
