"""ClassificationDataModule: reading JSONL/CSV, label order, dynamic padding, truncation, and one-paragraph errors."""

import json

import pytest
import torch

from lightningllm.cli import main
from lightningllm.data import ClassificationDataModule
from lightningllm.errors import ConfigError, DataError
from lightningllm.registry import get


def char_tokenizer(texts=("abcdefghijklmnopqrstuvwxyz ,.!?",)):
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train(list(texts))
    return tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"text": "hello there", "label": "pos"}, {"text": "bad", "label": "neg"},
        {"text": "fine day for it", "label": "pos"}, {"text": "meh", "label": "neutral"},
    ])  # fmt: skip
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "ok", "label": "neg"}, {"text": "nice", "label": "pos"}])
    return train, val


def test_labels_are_sorted_and_rows_padded_to_the_longest_in_the_batch(files):
    train, val = files
    tokenizer = char_tokenizer()
    data = ClassificationDataModule(train, val, tokenizer=tokenizer, batch_size=2)
    assert data.label_names == ["neg", "neutral", "pos"]  # sorted, not first-seen ("pos" first in the file)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    # "ok" and "nice": <bos> + chars, padded on the right to the longer (5 tokens), not to max_length
    bos, pad = tokenizer.bos_id, tokenizer.pad_id
    expected = torch.tensor([[bos, *tokenizer.encode("ok"), pad, pad], [bos, *tokenizer.encode("nice")]])
    assert torch.equal(batch["input_ids"], expected)
    assert torch.equal(batch["attention_mask"], expected != pad)
    assert batch["labels"].tolist() == [0, 2] and batch["index"].tolist() == [0, 1]
    train_lengths = {len(r) for r in data.datasets["train"].ids}
    assert train_lengths == {12, 4, 16}  # each text + <bos>


def test_integer_labels_sort_numerically_and_explicit_labels_fix_the_order(tmp_path):
    rows = [{"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": 1}]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    assert ClassificationDataModule(train, train, tokenizer=char_tokenizer()).label_names == ["1", "2", "10"]
    data = ClassificationDataModule(train, train, tokenizer=char_tokenizer(), labels=["10", "2", "1"])
    data.setup("fit")
    assert data.datasets["train"].labels == [0, 1, 2]


def test_csv_with_other_column_names(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('sentence,y\n"hi, you",a\nbye,b\n')
    data = ClassificationDataModule(str(path), str(path), tokenizer=char_tokenizer(), text_column="sentence",
                                    label_column="y")  # fmt: skip
    data.setup("fit")
    assert [e.text for e in data.read("train")] == ["hi, you", "bye"]
    assert data.datasets["train"].labels == [0, 1]


@pytest.mark.parametrize("side, kept", [("right", "abcde"), ("left", "fghij")])
def test_truncation_keeps_bos_and_drops_the_stated_side(tmp_path, side, kept):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "abcdefghij", "label": "x"}, {"text": "b", "label": "y"}])
    tokenizer = char_tokenizer()
    data = ClassificationDataModule(train, train, tokenizer=tokenizer, max_length=6, truncation=side)
    assert data.encode("abcdefghij") == [tokenizer.bos_id, *tokenizer.encode(kept)]


def test_tokenizer_comes_from_an_export_folder(tmp_path, files):
    train, val = files
    saved = char_tokenizer(["zyx"])
    saved.save(tmp_path / "export")
    data = ClassificationDataModule(train, val, tokenizer_dir=str(tmp_path / "export"))
    assert data.vocab_size == saved.vocab_size == 8
    assert data.encode("xyz") == [saved.bos_id, *saved.encode("xyz")]


def test_an_untrained_tokenizer_trains_on_the_training_texts(files):
    train, val = files
    data = ClassificationDataModule(train, val, tokenizer=get("tokenizer", "CharTokenizer")())
    assert data.vocab_size == 5 + len(set("hello there" + "bad" + "fine day for it" + "meh"))


def test_predict_rows_need_no_label(tmp_path, files):
    train, val = files
    predict = write_jsonl(tmp_path / "p.jsonl", [{"text": "what"}, {"text": "is", "label": "pos"}])
    data = ClassificationDataModule(train, val, predict_file=predict, tokenizer=char_tokenizer())
    data.setup("predict")
    assert data.datasets["predict"].labels == [-1, 2]


def bad_files(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "badline.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", label: y}\n')
    (tmp_path / "array.jsonl").write_text('["a", "x"]\n')
    write_jsonl(tmp_path / "nolabel.jsonl", [{"text": "a", "category": "x"}])
    write_jsonl(tmp_path / "unseen.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "z"}])
    write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    return good


@pytest.mark.parametrize(
    "train, val, message",
    [
        ("empty.jsonl", "good.jsonl", "is empty"),
        ("badline.jsonl", "good.jsonl", "Line 2 of"),
        ("array.jsonl", "good.jsonl", "JSON list, not an object"),
        ("nolabel.jsonl", "good.jsonl", "has no 'label' column \\(columns found: 'text', 'category'\\)"),
        ("good.jsonl", "unseen.jsonl", "Line 2 of .*has label 'z', which is not among the classes"),
        ("one.jsonl", "good.jsonl", "a single label 'x'"),
        ("missing.jsonl", "good.jsonl", "does not exist"),
    ],
)
def test_bad_files_are_one_paragraph(tmp_path, train, val, message):
    bad_files(tmp_path)
    data = ClassificationDataModule(str(tmp_path / train), str(tmp_path / val), tokenizer=char_tokenizer())
    with pytest.raises(DataError, match=message) as info:
        data.setup("fit")
    assert "\n" not in str(info.value)


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="exactly one of tokenizer"):
        ClassificationDataModule("t.jsonl", "v.jsonl")
    with pytest.raises(ConfigError, match="truncation='middle'"):
        ClassificationDataModule("t.jsonl", "v.jsonl", tokenizer=char_tokenizer(), truncation="middle")
    with pytest.raises(ConfigError, match="tokenizer_dir='nowhere' is not a folder"):
        ClassificationDataModule("t.jsonl", "v.jsonl", tokenizer_dir="nowhere")


def test_a_missing_label_column_exits_2_through_the_cli(tmp_path, capsys):
    bad_files(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(f"""
model:
  class_path: SequenceClassification
  init_args:
    model:
      class_path: Decoder
      init_args:
        dim: 16
        n_layers: 1
        n_heads: 2
        max_seq_len: 32
        attention: {{class_path: MultiHeadAttention}}
        ffn: {{class_path: MLP}}
        norm: {{class_path: LayerNorm}}
        position: {{class_path: LearnedPosition}}
        block: {{class_path: PreNorm}}
data:
  class_path: ClassificationDataModule
  init_args:
    train_file: {tmp_path / "nolabel.jsonl"}
    val_file: {tmp_path / "good.jsonl"}
    tokenizer: {{class_path: CharTokenizer}}
trainer: {{max_steps: 1, logger: false, enable_checkpointing: false, default_root_dir: {tmp_path}}}
""")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "has no 'label' column" in err and "Traceback" not in err
