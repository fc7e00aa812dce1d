"""lm-eval tasks built from the bundled Shakespeare corpus: no download, written once into the data cache.

- ``shakespeare_play``: which play is this line from? Four titles to choose from (multiple choice).
- ``shakespeare_cloze``: on the plays the pretraining demo held out, which line comes next? The true next
  line of the speech against three lines of the same play (multiple choice).
- ``shakespeare_speaker``: who says this line? The speaker's tag against three other speakers of the same
  play (multiple choice; the held-out plays).
- ``shakespeare_perplexity``: rolling log-likelihood of passages of the held-out plays (word and byte
  perplexity, bits per byte).

Rows are short (the demo model reads 128 characters). :func:`task_configs` returns lm-eval task configs
(dicts ``simple_evaluate`` accepts) whose ``dataset_kwargs`` point at the JSONL files.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from lightningllm.atomic import atomic_file
from lightningllm.data.corpus import Document, load_shakespeare
from lightningllm.data.instruction_shakespeare import speeches

#: the plays configs/pretrain/shakespeare-char.yaml holds out for validation (val_documents 2, seed 1337)
HELD_OUT = ("julius_caesar", "romeo_and_juliet")
POEMS = {"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece"}
TASKS = ("shakespeare_play", "shakespeare_cloze", "shakespeare_speaker", "shakespeare_perplexity")
FORMAT = 1  # bump when the rows of a task change
N_CHOICES = 4
LINE_CHARS = 60
MIN_LINE_CHARS = 20  # shorter lines ("Ay, my lord.") could come from any play


def title(name: str) -> str:
    """``julius_caesar`` -> ``Julius Caesar``."""
    return " ".join(word.capitalize() for word in name.split("_"))


def play_rows(documents: list[Document], n: int, rng: random.Random) -> list[dict]:
    """Which play is this line from: ``n`` lines, each with four titles (one right)."""
    plays = [d for d in documents if _name(d) not in POEMS]
    rows = []
    for _ in range(n):
        play = rng.choice(plays)
        lines = [s.text.split("\n")[0] for s in speeches(play.text) if len(s.text.split("\n")[0]) >= MIN_LINE_CHARS]
        others = rng.sample([title(_name(d)) for d in plays if d is not play], N_CHOICES - 1)
        choices, label = _shuffled(title(_name(play)), others, rng)
        rows.append({"line": rng.choice(lines)[:LINE_CHARS], "choices": choices, "label": label})
    return rows


def cloze_rows(documents: list[Document], n: int, rng: random.Random) -> list[dict]:
    """Which line comes next: the first line of a speech, then its second line against three others."""
    pool = []
    for play in _held_out(documents):
        lines = [s.text.split("\n") for s in speeches(play.text)]
        every = [line for speech in lines for line in speech]
        pool += [(speech[0], speech[1], every) for speech in lines if len(speech) >= 2]
    rows = []
    for first, second, every in rng.sample(pool, min(n, len(pool))):
        others = rng.sample([line for line in every if line != second], N_CHOICES - 1)
        choices, label = _shuffled(second[:LINE_CHARS], [o[:LINE_CHARS] for o in others], rng)
        rows.append({"line": first[:LINE_CHARS], "choices": choices, "label": label})
    return rows


def speaker_rows(documents: list[Document], n: int, rng: random.Random) -> list[dict]:
    """Who says this line: the speech's first line, its speaker's tag against three other tags of the play."""
    pool = []
    for play in _held_out(documents):
        found = speeches(play.text)
        tags = sorted({s.tag for s in found})
        pool += [(s.text.split("\n")[0], s.tag, tags) for s in found if len(tags) > N_CHOICES]
    rows = []
    for line, tag, tags in rng.sample(pool, min(n, len(pool))):
        choices, label = _shuffled(tag, rng.sample([t for t in tags if t != tag], N_CHOICES - 1), rng)
        rows.append({"line": line[:LINE_CHARS], "choices": choices, "label": label})
    return rows


def perplexity_rows(documents: list[Document], n: int, rng: random.Random) -> list[dict]:
    """Passages of about 400 characters from the held-out plays, cut at line ends."""
    rows = []
    for play in _held_out(documents):
        text = play.text
        for _ in range(n // len(HELD_OUT)):
            start = text.find("\n", rng.randrange(len(text) - 1000)) + 1
            end = text.rfind("\n", start, start + 400)
            rows.append({"text": text[start:end]})
    return rows


BUILDERS = {
    "shakespeare_play": play_rows,
    "shakespeare_cloze": cloze_rows,
    "shakespeare_speaker": speaker_rows,
    "shakespeare_perplexity": perplexity_rows,
}


def write_task_data(directory: str | os.PathLike, n: int = 200, seed: int = 1337,
                    data_dir: str | os.PathLike = ".cache/lightningllm") -> dict[str, Path]:  # fmt: skip
    """Write each task's JSONL (once per configuration) under ``directory``; return task -> file."""
    folder = Path(directory) / f"shakespeare-eval-v{FORMAT}-n{n}-seed{seed}"
    files = {task: folder / f"{task}.jsonl" for task in TASKS}
    if all(path.exists() for path in files.values()):
        return files
    documents = load_shakespeare(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for task, path in files.items():
        rows = BUILDERS[task](documents, n, random.Random(f"{seed}-{task}"))
        with atomic_file(path) as staged:
            Path(staged).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return files


def task_configs(files: dict[str, Path], names: list[str] | None = None) -> list[dict]:
    """lm-eval task configs (dicts) over the written files, for ``names`` (default: every task)."""
    configs = []
    for name in names or list(TASKS):
        common = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(files[name])}},
                  "test_split": "test"}  # fmt: skip
        if name == "shakespeare_perplexity":
            configs.append(
                {
                    **common,
                    "output_type": "loglikelihood_rolling",
                    "doc_to_text": "",
                    "doc_to_target": "{{text}}",
                    "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
                }
            )
        else:
            question = {"shakespeare_play": "Play:", "shakespeare_cloze": "", "shakespeare_speaker": "Speaker:"}[name]
            configs.append(
                {
                    **common,
                    "output_type": "multiple_choice",
                    "doc_to_text": "{{line}}\n" + question,
                    "doc_to_choice": "{{choices}}",
                    "doc_to_target": "{{label}}",
                    "target_delimiter": " " if question else "\n",
                    "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
                }
            )
    return configs


def _name(document: Document) -> str:
    return Path(document.name).stem


def _held_out(documents: list[Document]) -> list[Document]:
    return [d for d in documents if _name(d) in HELD_OUT]


def _shuffled(right: str, wrong: list[str], rng: random.Random) -> tuple[list[str], int]:
    choices = [right, *wrong]
    rng.shuffle(choices)
    return choices, choices.index(right)
