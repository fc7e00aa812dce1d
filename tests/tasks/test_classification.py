"""SequenceClassification: learning a tiny task, metrics by hand, the confusion PNG, predictions as JSONL."""

import json
import random
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightningllm.cli import main
from lightningllm.data import ClassificationDataModule
from lightningllm.errors import ConfigError
from lightningllm.models import Encoder
from lightningllm.prediction_writer import PredictionWriter
from lightningllm.registry import get
from lightningllm.tasks import SequenceClassification
from lightningllm.tasks.classification import confusion_scores, majority_baseline
from lightningllm.transforms import Freeze
from tests.conftest import build_decoder

LABELS = ["has_z", "no_z"]


def tiny_encoder(vocab_size: int) -> Encoder:
    plugins = dict(attention=get("attention", "MultiHeadAttention"), ffn=partial(get("ffn", "MLP"), activation="gelu"),
                   norm=get("norm", "LayerNorm"), position=get("position", "LearnedPosition"),
                   block=get("block", "PreNorm"))  # fmt: skip
    return Encoder(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, max_seq_len=64, **plugins)


def z_rows(n: int, seed: int) -> list[dict]:
    """Label: whether the text holds a 'z' anywhere (texts of 4..20 letters a-e, half with one z)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = [rng.choice("abcde") for _ in range(rng.randint(4, 20))]
        if i % 2:
            text[rng.randrange(len(text))] = "z"
        rows.append({"text": "".join(text), "label": "has_z" if i % 2 else "no_z"})
    return rows


@pytest.fixture
def z_files(tmp_path):
    paths = {}
    for split, n, seed in (("train", 256, 0), ("val", 64, 1)):
        paths[split] = tmp_path / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in z_rows(n, seed)))
    return str(paths["train"]), str(paths["val"])


def z_data(z_files, batch_size: int = 32) -> ClassificationDataModule:
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train(["abcdez"])
    return ClassificationDataModule(*z_files, tokenizer=tokenizer, batch_size=batch_size, max_length=32)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(max_steps=120, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
                    num_sanity_val_steps=0)  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


def test_a_decoder_learns_whether_a_text_holds_a_z(tmp_path, z_files):
    torch.manual_seed(0)
    data = z_data(z_files)
    optimizer = partial(torch.optim.AdamW, lr=3e-3)
    task = SequenceClassification(build_decoder(vocab_size=data.vocab_size), optimizer=optimizer)
    run = trainer(tmp_path)
    before = run.validate(task, datamodule=data, verbose=False)[0]
    run.fit(task, datamodule=data)
    after = run.validate(task, datamodule=data, verbose=False)[0]
    assert after["val/loss"] < 0.5 * before["val/loss"]
    assert after["val/accuracy"] > 0.9 and task.label_names == LABELS


def test_an_encoder_with_first_token_pooling_learns_too(tmp_path, z_files):
    torch.manual_seed(0)
    data = z_data(z_files)
    task = SequenceClassification(tiny_encoder(data.vocab_size), optimizer=partial(torch.optim.AdamW, lr=3e-3))
    assert task.pooling == "first"
    run = trainer(tmp_path)
    run.fit(task, datamodule=data)
    assert run.validate(task, datamodule=data, verbose=False)[0]["val/accuracy"] > 0.9


def test_metrics_match_a_hand_computation_and_the_confusion_matrix_is_drawn(tmp_path, z_files):
    torch.manual_seed(0)
    data = z_data(z_files, batch_size=16)
    task = SequenceClassification(build_decoder(vocab_size=data.vocab_size))
    run = trainer(tmp_path, max_steps=10, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"))
    run.fit(task, datamodule=data)
    logged = run.validate(task, datamodule=data, verbose=False)[0]

    rows = [r for batch in run.predict(task, datamodule=data) for r in zip(batch["probabilities"], batch["labels"])]
    predicted = [int(p.argmax()) for p, _ in rows]
    true = [int(t) for _, t in rows]
    accuracy = sum(p == t for p, t in zip(predicted, true)) / len(true)
    f1s = []
    for c in range(2):
        tp = sum(p == c and t == c for p, t in zip(predicted, true))
        fp = sum(p == c and t != c for p, t in zip(predicted, true))
        fn = sum(p != c and t == c for p, t in zip(predicted, true))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    assert logged["val/accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert logged["val/macro_f1"] == pytest.approx(sum(f1s) / 2, abs=1e-6)
    matrix = torch.zeros(2, 2, dtype=torch.long)
    for p, t in zip(predicted, true):
        matrix[t, p] += 1
    assert confusion_scores(matrix) == pytest.approx({"accuracy": accuracy, "macro_f1": sum(f1s) / 2})
    png = tmp_path / "logs" / "version_0" / "confusion_matrix.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_head_only_training_leaves_the_backbone_bit_identical(tmp_path, z_files):
    torch.manual_seed(0)
    data = z_data(z_files)
    # the LM head is tied to the embedding, so Freeze(head) first leaves the embedding trainable; replacing the
    # head by a ClassificationHead must freeze it again
    model = build_decoder(vocab_size=data.vocab_size, transforms=[Freeze(train="head")])
    task = SequenceClassification(model, classes=LABELS)
    assert type(task.model.head).__name__ == "ClassificationHead" and task.model.head.labels == LABELS
    assert {n for n, p in task.model.named_parameters() if p.requires_grad} == {"head.proj.weight", "head.proj.bias"}
    backbone = {k: v.clone() for k, v in task.model.state_dict().items() if not k.startswith("head.")}
    head = task.model.head.proj.weight.clone()
    trainer(tmp_path, max_steps=5).fit(task, datamodule=data)
    assert all(torch.equal(v, task.model.state_dict()[k]) for k, v in backbone.items())
    assert not torch.equal(head, task.model.head.proj.weight)


def test_a_classifier_export_keeps_its_labels_and_head(tmp_path, z_files):
    from lightningllm.io import export, load

    data = z_data(z_files)
    task = SequenceClassification(build_decoder(vocab_size=data.vocab_size), classes=LABELS, pooling="mean")
    export(task.model, tmp_path / "export", tokenizer=data.tokenizer)
    model, _ = load(tmp_path / "export")
    assert model.head.labels == LABELS and model.head.pooling == "mean"
    again = SequenceClassification(model)  # the classes come from the head
    assert again.label_names == LABELS and again.model.head is model.head
    batch = next(iter(data.val_dataloader()))
    torch.testing.assert_close(again(batch["input_ids"], batch["attention_mask"]),
                               task.eval()(batch["input_ids"], batch["attention_mask"]))  # fmt: skip


def test_balanced_class_weights_weigh_the_loss(tmp_path, z_files):
    data = z_data(z_files)
    data.setup("fit")
    data.datasets["train"].labels[:10] = [0] * 10  # 133 has_z, 123 no_z after this
    task = SequenceClassification(build_decoder(vocab_size=data.vocab_size), class_weights="balanced")
    task.trainer = trainer(tmp_path)
    task.trainer.datamodule = data
    task.setup("fit")
    counts = torch.tensor([133.0, 123.0])
    torch.testing.assert_close(task._weights, 256 / (2 * counts))
    batch = next(iter(data.val_dataloader()))
    loss, logits = task.loss(batch)
    expected = F.cross_entropy(logits, batch["labels"], weight=256 / (2 * counts))
    torch.testing.assert_close(loss, expected)


def test_bad_task_options_are_refused(z_files):
    decoder = build_decoder()
    with pytest.raises(ConfigError, match="pooling='first' on the causal Decoder"):
        SequenceClassification(decoder, pooling="first")
    with pytest.raises(ConfigError, match="pooling='max' is not a pooling"):
        SequenceClassification(decoder, pooling="max")
    task = SequenceClassification(decoder, classes=["a", "b", "c"])
    task.trainer = trainer(".")
    task.trainer.datamodule = z_data(z_files)
    with pytest.raises(ConfigError, match=r"classes=\['a', 'b', 'c'\] differ from the data's classes"):
        task.setup("fit")


CONFIG = """
seed_everything: 0
model:
  class_path: SequenceClassification
  init_args:
    model:
      class_path: Decoder
      init_args:
        dim: 32
        n_layers: 2
        n_heads: 4
        max_seq_len: 32
        attention: {{class_path: MultiHeadAttention}}
        ffn: {{class_path: MLP}}
        norm: {{class_path: LayerNorm}}
        position: {{class_path: LearnedPosition}}
        block: {{class_path: PreNorm}}
    optimizer: {{class_path: torch.optim.AdamW, init_args: {{lr: 3.0e-3}}}}
data:
  class_path: ClassificationDataModule
  init_args:
    train_file: {train}
    val_file: {val}
    predict_file: {predict}
    tokenizer: {{class_path: CharTokenizer}}
    batch_size: 32
    max_length: 32
trainer:
  max_steps: 40
  enable_progress_bar: false
  default_root_dir: {root}
  logger: {{class_path: CSVLogger, init_args: {{save_dir: {root}, name: logs}}}}
  callbacks:
    - class_path: ModelCheckpoint
      init_args: {{dirpath: {root}/checkpoints, filename: last}}
    - class_path: PredictionWriter
      init_args: {{output: {root}/predictions.jsonl}}
"""


def test_predict_writes_one_json_line_per_input_with_label_names(tmp_path, z_files):
    predict = tmp_path / "predict.jsonl"
    predict.write_text('{"text": "abzab"}\n{"text": "abcab", "label": "no_z"}\n{"text": "zz"}\n')
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(train=z_files[0], val=z_files[1], predict=predict, root=tmp_path))
    main(["fit", "--config", str(config)])
    assert not (tmp_path / "predictions.jsonl").exists()  # the writer writes on predict only
    main(["predict", "--config", str(config), f"--ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"])
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert [line["text"] for line in lines] == ["abzab", "abcab", "zz"]
    for line in lines:
        probabilities = line["probabilities"]
        assert list(probabilities) == LABELS and sum(probabilities.values()) == pytest.approx(1, abs=1e-5)
        assert line["label"] == max(probabilities, key=probabilities.get)
    assert "target" not in lines[0] and lines[1]["target"] == "no_z"


def test_predict_failure_leaves_the_previous_file(tmp_path):
    writer = PredictionWriter(output=str(tmp_path / "p.jsonl"))
    (tmp_path / "p.jsonl").write_text("old\n")

    class Module(L.LightningModule):
        label_names = LABELS

    run = trainer(tmp_path)
    writer.on_predict_start(run, Module())
    writer._handle.write("partial\n")
    writer.on_exception(run, Module(), RuntimeError("killed"))
    assert (tmp_path / "p.jsonl").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p.jsonl"]


def test_a_label_unseen_in_training_exits_2_through_the_cli(tmp_path, z_files, capsys):
    val = tmp_path / "unseen.jsonl"
    val.write_text('{"text": "ab", "label": "no_z"}\n{"text": "ab", "label": "maybe_z"}\n')
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(train=z_files[0], val=val, predict=val, root=tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "has label 'maybe_z', which is not among the classes" in err and "Traceback" not in err


def test_majority_baseline_by_hand():
    train = torch.tensor([0, 1, 1, 2, 1])  # class 1 is the majority
    val = torch.tensor([1, 0, 2, 2])
    baseline = majority_baseline(train, val, 3)
    # class 1: precision 1/4, recall 1/1, F1 = 2 * 0.25 / 1.25 = 0.4; classes 0 and 2: F1 0
    assert baseline == {"class": 1, "accuracy": 0.25, "macro_f1": pytest.approx(0.4 / 3)}


def test_the_shipped_config_parses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/finetune/classify-shakespeare.yaml", "--print_config"])
    assert exit_info.value.code == 0
    assert "ShakespeareGenreDataModule" in capsys.readouterr().out
