"""benchmarks/evaluate_exports.py: the table holds what `evaluate_export` scores, one column per export."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from lightningllm.evaluation.command import evaluate_export
from tests.evaluation.test_shakespeare_tasks import tiny_export  # noqa: F401 (a fixture)

pytest.importorskip("lm_eval")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "evaluate_exports.py"
spec = importlib.util.spec_from_file_location("evaluate_exports", SCRIPT)
evaluate_exports = sys.modules.setdefault("evaluate_exports", importlib.util.module_from_spec(spec))
spec.loader.exec_module(evaluate_exports)


def test_scores_keep_the_headline_metrics_and_drop_stderr():
    results = {"results": {"cloze": {"alias": "cloze", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25},
                           "ppl": {"bits_per_byte,none": 2.4, "word_perplexity,none": 90.0}}}  # fmt: skip
    assert evaluate_exports.scores(results) == {
        ("cloze", "acc"): 0.5, ("cloze", "acc_norm"): 0.25, ("ppl", "bits_per_byte"): 2.4
    }  # fmt: skip


def test_the_table_has_each_exports_scores_in_its_column(tiny_export, tmp_path):  # noqa: F811
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    rows = [{"line": "the quick", "choices": ["fox", "dog"], "label": 0}, {"line": "to be", "choices": ["or", "cat"],
            "label": 0}, {"line": "the lazy", "choices": ["bird", "dog"], "label": 1}]  # fmt: skip
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "mine.yaml").write_text(yaml.safe_dump({
        "task": "mine", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / "data.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{line}}", "doc_to_choice":
        "{{choices}}", "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}],
    }))  # fmt: skip
    out = tmp_path / "table.md"
    table = evaluate_exports.main([f"a={tiny_export}", f"b={tiny_export}", "--tasks", "mine",
                                   "--include_path", str(folder), "--out", str(out)])  # fmt: skip
    direct = evaluate_export(str(tiny_export), ["mine"], str(folder))["results"]["mine"]["acc,none"]
    assert out.read_text() == table
    assert table.splitlines()[0] == "| task | metric | a | b |"
    assert f"| mine | acc | {direct:.3f} | {direct:.3f} |" in table


def test_a_bad_pair_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_exports.main(["runs/export"])
    assert exit_info.value.code == 2 and "name=EXPORT_DIR" in capsys.readouterr().err
