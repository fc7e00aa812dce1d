"""The bundled lm-eval tasks: rows built from the plays as their docstrings say, and `lightningllm evaluate`."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from lightningllm.data.corpus import Document
from lightningllm.evaluation import shakespeare_tasks as tasks

pytest.importorskip("lm_eval")
SPEAKERS = ["Bru.", "Cas.", "Ant.", "Caes.", "Cask.", "Rom.", "Jul."]


def play(name: str, n_speeches: int = 40) -> Document:
    rng = random.Random(name)
    parts = []
    for i in range(n_speeches):
        tag = SPEAKERS[rng.randrange(len(SPEAKERS))]
        parts.append(f"{tag}\n{name} speech number {i} opens here\nand {name} goes on {i}")
    return Document(f"{name}.txt", "\n\n" + "\n\n".join(parts) + "\n\n")


DOCUMENTS = [play(n) for n in ("julius_caesar", "romeo_and_juliet", "hamlet", "tempest", "macbeth")]


def test_play_rows_name_the_play_each_line_comes_from():
    rows = tasks.play_rows(DOCUMENTS, 30, random.Random(0))
    for row in rows:
        assert len(set(row["choices"])) == tasks.N_CHOICES
        answer = row["choices"][row["label"]]
        source = next(d for d in DOCUMENTS if tasks.title(d.name.removesuffix(".txt")) == answer)
        assert row["line"] in source.text


def test_cloze_and_speaker_rows_come_from_the_held_out_plays_only():
    held_out = "".join(d.text for d in DOCUMENTS if d.name.removesuffix(".txt") in tasks.HELD_OUT)
    for row in tasks.cloze_rows(DOCUMENTS, 20, random.Random(0)):
        following = row["choices"][row["label"]]
        assert f"{row['line']}\n{following}" in held_out
    for row in tasks.speaker_rows(DOCUMENTS, 20, random.Random(0)):
        assert f"{row['choices'][row['label']]}\n{row['line']}" in held_out
        assert len(set(row["choices"])) == tasks.N_CHOICES


def test_task_data_is_written_once_and_configs_point_at_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tasks, "load_shakespeare", lambda data_dir: calls.append(1) or DOCUMENTS)
    files = tasks.write_task_data(tmp_path, n=10)
    assert tasks.write_task_data(tmp_path, n=10) == files and len(calls) == 1  # cached
    for config in tasks.task_configs(files):
        rows = [json.loads(line) for line in open(config["dataset_kwargs"]["data_files"]["test"])]
        assert rows and config["task"] in tasks.TASKS


@pytest.fixture
def tiny_export(tmp_path):
    from lightningllm.io import export
    from lightningllm.registry import get, load_plugins
    from tests.conftest import build_decoder

    load_plugins()
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train(iter(["the quick brown fox jumps over the lazy dog? Who: to be or not question cat bird"]))
    return export(build_decoder(vocab_size=tokenizer.vocab_size), tmp_path / "export", tokenizer=tokenizer)


def test_evaluate_command_runs_a_local_task_directory(tiny_export, tmp_path, capsys):
    from lightningllm.cli import main

    folder = tmp_path / "my_tasks"
    folder.mkdir()
    (folder / "data.jsonl").write_text(json.dumps({"line": "the quick", "choices": ["fox", "dog"], "label": 0}) + "\n")
    (folder / "mine.yaml").write_text(yaml.safe_dump({
        "task": "mine", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / "data.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{line}}", "doc_to_choice":
        "{{choices}}", "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}],
    }))  # fmt: skip
    main(["evaluate", str(tiny_export), "--include_path", str(folder), "--tasks", "[mine]",
          "--output", str(tmp_path / "out.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert "mine" in out and "acc" in out
    assert "mine" in json.loads((tmp_path / "out.json").read_text())["results"]


@pytest.mark.parametrize(
    "args, expected",
    [(["--tasks", "[no_such_task]"], "Unknown task(s) no_such_task"), (["--limit", "0"], "--limit 0 must be")],
)
def test_evaluate_bad_input_is_one_paragraph_exit_2(tiny_export, capsys, args, expected):
    from lightningllm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(tiny_export), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
