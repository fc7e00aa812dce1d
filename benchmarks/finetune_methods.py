"""Fine-tuning methods side by side on the default tasks, starting from the `make demo` export.

Each run is ``lightningllm fit`` in its own process on a task config (``configs/finetune/``) composed with a
method fragment (``configs/finetune/methods/``, or a forgetting fragment), writing only under ``--out``. Per
run it reports the trainable share (the line printed when fitting starts), the peak resident memory of the
process, the wall time, the task metric at the end, and the rise of the pretraining validation loss that the
forgetting ledger logs at the start and end of every fine-tuning run.

    python benchmarks/finetune_methods.py                       # the methods table, both tasks
    python benchmarks/finetune_methods.py --table forgetting    # full vs replay vs EWC vs L2-SP vs LoRA (SFT)
    python benchmarks/finetune_methods.py --methods full lora --tasks classify --max_steps 5   # a smoke run

The markdown table goes to ``--out/<table>.md`` and is printed.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "finetune"
TASKS = {
    "sft": (CONFIGS / "sft-shakespeare.yaml", "val/loss", "response loss"),  # exact match needs ~250 steps
    "classify": (CONFIGS / "classify-shakespeare.yaml", "val/macro_f1", "macro F1"),
}
METHODS = {
    "full": [],
    **{name: [CONFIGS / "methods" / f"{name}.yaml"] for name in
       ("lora", "qlora", "dora", "ia3", "bottleneck", "prefix", "prompt")},
}  # fmt: skip
FORGETTING = {
    "full": [],
    "replay": [CONFIGS / "replay.yaml"],
    "ewc": [CONFIGS / "ewc.yaml"],
    "l2sp": [CONFIGS / "l2sp.yaml"],
    "lora": [CONFIGS / "methods" / "lora.yaml"],
}
VIRTUAL_TOKENS = {"prefix": 16, "prompt": 16}  # positions the method puts before the input
TASK_LENGTH = {"sft": "seq_len", "classify": "max_length"}
LEDGER_START, LEDGER_END = "forgetting/pretrain_loss_start", "forgetting/pretrain_loss_end"
TRAINABLE = re.compile(r"trainable ([\d,]+) of ([\d,]+) parameters \(([\d.]+)%\)")


@dataclass
class Result:
    task: str
    method: str
    trainable_pct: float | None
    peak_mib: float
    seconds: float
    metric: float | None
    pretrain_rise: float | None
    status: str


def run(task: str, method: str, fragments: list[Path], out: Path, max_steps: int | None) -> Result:
    """One ``lightningllm fit`` in a child process; its peak RSS comes from ``wait4``."""
    config, metric_name, _ = TASKS[task]
    root = (out / f"{task}-{method}").resolve()  # the child runs inside it: every path it gets is absolute
    command = [sys.executable, "-m", "lightningllm.cli", "fit", "--config", str(config)]
    for fragment in fragments:
        command += ["--config", str(fragment)]
    command += [
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.logger.init_args.name=logs",
        "--trainer.enable_progress_bar=false",
        "--overwrite=true",
    ]
    if method in VIRTUAL_TOKENS:  # the model reads 128 positions: leave room for the 16 virtual tokens
        command += [f"--data.init_args.{TASK_LENGTH[task]}={128 - VIRTUAL_TOKENS[method]}"]
    if max_steps is not None:
        command += [f"--trainer.max_steps={max_steps}", f"--trainer.val_check_interval={max_steps}"]
    log_path = root.with_suffix(".log")
    _sandbox(root)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    text = log_path.read_text(errors="replace")
    found = TRAINABLE.search(text)
    metrics = _last_metrics(root)
    rise = None
    if LEDGER_START in metrics and LEDGER_END in metrics:
        rise = metrics[LEDGER_END] - metrics[LEDGER_START]
    return Result(
        task=task,
        method=method,
        trainable_pct=float(found.group(3)) if found else None,
        peak_mib=usage.ru_maxrss / 1024,
        seconds=seconds,
        metric=metrics.get(metric_name),
        pretrain_rise=rise,
        status="ok" if os.waitstatus_to_exitcode(status) == 0 else f"failed (see {log_path})",
    )


def _sandbox(root: Path) -> None:
    """A working folder for one run: the configs' relative outputs (``runs/...``) land in it, never over the
    user's runs, while the start export and the corpus cache are the user's (linked)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "runs").mkdir(exist_ok=True)
    for link, target in ((root / "runs" / "shakespeare-char", ROOT / "runs" / "shakespeare-char"),
                         (root / ".cache", ROOT / ".cache")):  # fmt: skip
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)


def _last_metrics(root: Path) -> dict[str, float]:
    """The last value of every metric in the run's CSVLogger ``metrics.csv`` files."""
    values: dict[str, float] = {}
    for path in sorted(root.glob("logs/**/metrics.csv")):
        with open(path) as handle:
            for row in csv.DictReader(handle):
                values.update({key: float(value) for key, value in row.items() if value not in ("", None)})
    return values


def table(results: list[Result]) -> str:
    """Markdown: one row per run."""
    lines = [
        "| task | method | trainable | peak RSS (MiB) | wall (s) | task metric | pretraining loss rise | status |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.task} | {r.method} | {_fmt(r.trainable_pct, '{:.2f}%')} | {r.peak_mib:.0f} | {r.seconds:.0f} | "
            f"{_fmt(r.metric, '{:.3f}')} {TASKS[r.task][2]} | {_fmt(r.pretrain_rise, '{:+.3f}')} | {r.status} |"
        )
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else spec.format(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=("methods", "forgetting"), default="methods")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=None)
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the table's methods")
    parser.add_argument("--max_steps", type=int, default=None, help="override the configs' max_steps")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "finetune-methods")
    args = parser.parse_args()
    choices = METHODS if args.table == "methods" else FORGETTING
    tasks = args.tasks or (sorted(TASKS) if args.table == "methods" else ["sft"])
    methods = args.methods or list(choices)
    unknown = sorted(set(methods) - set(choices))
    if unknown:
        allowed = ", ".join(choices)
        parser.error(f"unknown method(s) {', '.join(unknown)} for --table {args.table}: choose from {allowed}.")
    results = []
    for task in tasks:
        for method in methods:
            results.append(run(task, method, choices[method], args.out, args.max_steps))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    report = table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.table}.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
