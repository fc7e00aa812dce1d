"""InstructionDataModule: JSONL records of both forms, the Shakespeare instructions split by play, data errors."""

from __future__ import annotations

import json

import pytest
import yaml

from lightningllm.cli import main
from lightningllm.contracts import IGNORE_INDEX
from lightningllm.data.corpus import Document
from lightningllm.data.instruction import InstructionDataModule, read_jsonl
from lightningllm.data.instruction_shakespeare import shakespeare_instructions, speeches
from lightningllm.errors import ConfigError, DataError
from lightningllm.registry import get

PLAY = """THE TRAGEDY OF {title}

ACT I.

Scene I. A street.

[Enter {a} and {b}.]

{a}.
Who's there?

{b}.
Nay, answer me: stand,
and unfold yourself.

{a}.
Long live the king!

[Exit {b}.]

{c}.
Bernardo?

{a}.
He.
"""
PLAYS = {
    "alpha": ("ALPHA", "Ber", "Fran", "Hor"),
    "beta": ("BETA", "Romeo", "Juliet", "Nurse"),
    "gamma": ("GAMMA", "Lear", "Kent", "Fool"),
}


def write_corpus(tmp_path):
    folder = tmp_path / "cache" / "corpora" / "shakespeare"
    folder.mkdir(parents=True)
    for name, (title, a, b, c) in PLAYS.items():
        (folder / f"{name}.txt").write_text(PLAY.format(title=title, a=a, b=b, c=c))
    return tmp_path / "cache"


@pytest.fixture
def tokenizer_dir(tmp_path):
    tokenizer = get("tokenizer", "CharTokenizer")()
    texts = [PLAY.format(title=t, a=a, b=b, c=c) for t, a, b, c in PLAYS.values()]
    tokenizer.train(texts + ['User: Assistant: System: Who speaks next? Who says "x"? {}[]:,0123456789'])
    tokenizer.save(tmp_path / "tokenizer")
    return str(tmp_path / "tokenizer")


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


ALPACA = {"instruction": "Who speaks?", "input": "Ber.\nWho's there?", "output": "Fran."}
CHAT = {
    "messages": [
        {"role": "user", "content": "Who speaks?"},
        {"role": "assistant", "content": "Ber."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Kent."},
    ]
}


def test_speeches_are_tags_with_their_lines_and_no_stage_directions():
    found = speeches(PLAY.format(title="T", a="Ber", b="Fran", c="Hor"))
    assert [(s.tag, s.text) for s in found] == [
        ("Ber.", "Who's there?"),
        ("Fran.", "Nay, answer me: stand,\nand unfold yourself."),
        ("Ber.", "Long live the king!"),
        ("Hor.", "Bernardo?"),
        ("Ber.", "He."),
    ]


def test_shakespeare_answers_are_read_off_the_text():
    records = shakespeare_instructions([Document("alpha", PLAY.format(title="T", a="Ber", b="Fran", c="Hor"))],
                                       lambda record: True, seed=0)  # fmt: skip
    by_task = {}
    for record in records:
        by_task.setdefault(record["task"], []).append(record)
    # Speeches: Ber., Fran., Ber., Hor., Ber.; a "next" question after (Ber., Fran.) and after (Ber., Hor.).
    tags = [[block.split("\n")[0] for block in r["input"].split("\n\n")] + [r["output"]] for r in by_task["next"]]
    assert tags == [["Ber.", "Fran.", "Ber."], ["Ber.", "Hor.", "Ber."]]
    for record in by_task["speaker"]:
        quote = record["instruction"].split('"')[1]
        tag_above = [block.split("\n")[0] for block in record["input"].split("\n\n") if quote in block]
        assert tag_above == [record["output"]]


def test_jsonl_records_of_both_forms_train_on_responses_only(tmp_path, tokenizer_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [ALPACA, CHAT] * 4)
    dm = InstructionDataModule(tokenizer_dir, train=train, val=train, batch_size=4, pack=False, n_eval=2)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    tokenizer = dm.tokenizer
    first = [t for t in batch["labels"][0].tolist() if t != IGNORE_INDEX]
    assert tokenizer.decode(first) == "Fran.<eos>"
    second = [t for t in batch["labels"][1].tolist() if t != IGNORE_INDEX]
    assert tokenizer.decode(second) == "Ber.<eos>Kent.<eos>"
    assert [answer for _, answer, _ in dm.eval_set()] == ["Fran.", "Kent."]


def test_shakespeare_source_holds_out_whole_plays(tmp_path, tokenizer_dir):
    cache = str(write_corpus(tmp_path))
    dm = InstructionDataModule(tokenizer_dir, data_dir=cache, val_documents=1, seed=0, n_eval=3, pack_len=512)
    dm.setup("fit")
    names = {split: {r["output"] for r in dm.records[split]} for split in ("train", "val")}
    assert names["train"] and names["val"] and not names["train"] & names["val"]
    batch = next(iter(dm.train_dataloader()))
    assert {"positions", "document_ids"} <= set(batch) and int(batch["document_ids"].max()) >= 1  # packed


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"instruction": "x", "output": ', "train.jsonl line 2 is not valid JSON"),
        ('{"instruction": "x"}', "line 2: a record with ['instruction'] is neither an Alpaca record"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "'role' (one of system, user, assistant)"),
        ('{"instruction": "x", "input": 3, "output": "y"}', "'input' is 3"),
    ],
)
def test_bad_records_are_named_by_line(tmp_path, line, expected):
    path = write_jsonl(tmp_path / "train.jsonl", [ALPACA, line])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert expected in str(info.value)


def test_a_record_longer_than_seq_len_is_refused(tmp_path, tokenizer_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [ALPACA, {**ALPACA, "output": "Fran. " * 40}])
    dm = InstructionDataModule(tokenizer_dir, train=train, val=train, seq_len=64)
    with pytest.raises(DataError, match="train.jsonl record 2 renders to .* tokens, more than seq_len=64"):
        dm.setup("fit")


def test_a_train_file_needs_a_val_file(tmp_path, tokenizer_dir):
    with pytest.raises(ConfigError, match="val must name a JSON-lines file"):
        InstructionDataModule(tokenizer_dir, train=str(tmp_path / "train.jsonl"))


def test_bad_data_is_one_paragraph_and_exit_2_from_the_cli(tmp_path, tokenizer_dir, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [ALPACA, '{"messages": "hello"}'])
    config = {
        "model": {
            "class_path": "lightningllm.tasks.InstructionTuning",
            "init_args": {"model": {"class_path": "lightningllm.models.Decoder", "init_args": {
                "dim": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 128, "attention": "MultiHeadAttention",
                "ffn": "MLP", "norm": "LayerNorm", "position": "LearnedPosition", "block": "PreNorm"}}},
        },
        "data": {"class_path": "lightningllm.data.InstructionDataModule",
                 "init_args": {"tokenizer_dir": tokenizer_dir, "train": train, "val": train}},
        "trainer": {"max_steps": 1, "logger": False, "enable_checkpointing": False, "default_root_dir": str(tmp_path)},
    }  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(path)])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "train.jsonl line 2: 'messages' must be a non-empty list" in err
    assert "Traceback" not in err and err.strip().count("\n") == 0
