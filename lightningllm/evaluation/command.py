"""``lightningllm evaluate EXPORT``: lm-evaluation-harness tasks on an export, from local task files only.

    lightningllm evaluate runs/shakespeare-char/export                      # the bundled Shakespeare tasks
    lightningllm evaluate EXPORT --tasks shakespeare_cloze --limit 50
    lightningllm evaluate EXPORT --include_path my_tasks/ --tasks my_task   # any lm-eval task directory

Prints one line per task and metric and, with ``--output FILE``, writes lm-eval's results as JSON.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from lightningllm.errors import ConfigError, LightningLLMError
from lightningllm.parse_errors import ShortErrors

log = logging.getLogger(__name__)
SUMMARY = "Score an export on lm-evaluation-harness tasks (bundled Shakespeare tasks or a local task directory)."


def evaluate_export(
    export_dir: str,
    tasks: list[str] | None = None,
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    n: int = 200,
    device: str = "cpu",
    trust_code: bool = False,
) -> dict:
    """Run lm-eval's ``simple_evaluate`` on the export's model; return its results dict."""
    lm_eval = _import_lm_eval()
    from lightningllm.evaluation.harness import HarnessLM
    from lightningllm.evaluation.shakespeare_tasks import TASKS, task_configs, write_task_data
    from lightningllm.io import load

    model, tokenizer = load(export_dir, device=device, trust_code=trust_code)
    if tokenizer is None or not getattr(model, "causal", False):
        raise LightningLLMError(
            f"The export {export_dir!r} holds {'no tokenizer' if tokenizer is None else 'a non-causal model'}; "
            "lm-eval scores text with a causal language model and its tokenizer (a decoder export)."
        )
    names = tasks or ([] if include_path else list(TASKS))
    bundled = [name for name in names if name in TASKS]
    configs = task_configs(write_task_data(".cache/lightningllm/eval", n=n), bundled) if bundled else []
    others = [name for name in names if name not in TASKS]
    # lm-eval's own tasks download their data: only the bundled ones and include_path are indexed (and fast)
    manager = lm_eval.tasks.TaskManager(include_path=include_path, include_defaults=False)
    if others and not include_path:
        raise ConfigError(
            f"Unknown task(s) {', '.join(others)}: the bundled tasks are {', '.join(TASKS)}; name a local lm-eval "
            "task directory with --include_path to use others (nothing is downloaded)."
        )
    return lm_eval.simple_evaluate(
        model=HarnessLM(model, tokenizer, batch_size=batch_size), tasks=configs + others, limit=limit,
        task_manager=manager, log_samples=False, bootstrap_iters=0,
    )  # fmt: skip


def metric_values(results: dict) -> Iterator[tuple[str, str, float]]:
    """(task, metric, value) from lm-eval's results, tasks in name order, stderr entries left out (``acc,none``
    -> ``acc``)."""
    for task, metrics in sorted(results["results"].items()):
        for key, value in metrics.items():
            if isinstance(value, float) and "stderr" not in key:
                yield task, key.split(",")[0], value


def metric_lines(results: dict) -> list[str]:
    """``task  metric  value`` lines from lm-eval's results (stderr entries left out)."""
    return [f"{task:<24} {metric:<16} {value:.4f}" for task, metric, value in metric_values(results)]


def evaluate_command(args: Sequence[str]) -> None:
    """The ``evaluate`` command: parse, evaluate, print, optionally write JSON."""
    cfg = _parser().parse_args(list(args))
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"--limit {cfg.limit} must be a positive number of examples per task.")
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch_size {cfg.batch_size} must be at least 1.")
    results = evaluate_export(cfg.export_dir, cfg.tasks, cfg.include_path, cfg.limit, cfg.batch_size, cfg.n,
                              cfg.device, cfg.trust_code)  # fmt: skip
    sys.stdout.write("".join(line + "\n" for line in metric_lines(results)))
    if cfg.output:
        from lightningllm.atomic import atomic_file

        with atomic_file(cfg.output) as staged:
            Path(staged).write_text(json.dumps({"results": results["results"]}, indent=2, default=str))


def _parser() -> ShortErrors:
    parser = ShortErrors(prog="lightningllm evaluate", description=SUMMARY)
    parser.add_argument("export_dir", help="A lightningllm export folder (a decoder and its tokenizer).")
    parser.add_argument("--tasks", type=list[str] | None, default=None,
                        help="Task names (default: every bundled Shakespeare task).")  # fmt: skip
    parser.add_argument("--include_path", type=str | None, default=None, help="A local lm-eval task directory.")
    parser.add_argument("--limit", type=int | None, default=None, help="At most this many examples per task.")
    parser.add_argument("--batch_size", type=int, default=16, help="Rows scored together.")
    parser.add_argument("--n", type=int, default=200, help="Examples per bundled task (written once, cached).")
    parser.add_argument("--device", type=str, default="cpu", help="cpu or cuda.")
    parser.add_argument("--output", type=str | None, default=None, help="Write the results as JSON to this file.")
    parser.add_argument("--trust_code", type=bool, default=False, help="Allow classes outside lightningllm.")
    return parser


def _import_lm_eval():
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError:
        raise LightningLLMError(
            "`lightningllm evaluate` needs lm-evaluation-harness: pip install 'lightningllm[eval]'."
        ) from None
    return lm_eval
