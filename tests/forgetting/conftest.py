"""Fixtures of the forgetting tests: a tiny decoder pretrained on a small corpus with two held-out documents,
exported with its tokenizer, and fine-tuning on a different text (the same characters, reversed)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightningllm.data.text import TextDataModule
from lightningllm.forgetting import PretrainingData
from lightningllm.io import export
from lightningllm.registry import get
from lightningllm.tasks import CausalLM
from tests.conftest import build_decoder

WORDS = "the king and queen speak of love war and honour to their lords in the castle at night".split()
SEQ_LEN = 16


def documents(n: int = 6, words: int = 400) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + ".\n" for _ in range(n)]


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """``corpus``, ``data_dir`` and ``export`` (a decoder pretrained for 200 steps, its tokenizer beside it)."""
    root = tmp_path_factory.mktemp("pretrained")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(documents()):
        (corpus / f"doc{i}.txt").write_text(text)
    tokenizer = get("tokenizer", "CharTokenizer")()
    data = TextDataModule(tokenizer, corpus=str(corpus), data_dir=str(root / "cache"), seq_len=SEQ_LEN, batch_size=16,
                          val_documents=2, seed=0)  # fmt: skip
    data.setup("fit")
    torch.manual_seed(0)
    model = build_decoder(vocab_size=tokenizer.vocab_size, n_layers=1, max_seq_len=SEQ_LEN)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step, batch in enumerate(data.train_dataloader()):
        loss = F.cross_entropy(model(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 200:
            break
    export(model, root / "export", tokenizer)
    val = data.datasets["val"]
    return SimpleNamespace(corpus=str(corpus), data_dir=str(root / "cache"), export=str(root / "export"),
                           vocab_size=tokenizer.vocab_size, tokenizer=tokenizer,
                           val_windows=torch.stack([val[i]["input_ids"] for i in range(len(val))]))  # fmt: skip


@pytest.fixture
def pretraining(pretrained):
    """The PretrainingData of the pretrained export (as its run split the corpus)."""
    return PretrainingData(pretrained.export, corpus=pretrained.corpus, val_documents=2, seed=0, seq_len=SEQ_LEN,
                           batch_size=16, data_dir=pretrained.data_dir)  # fmt: skip


def start_model(pretrained, **kwargs):
    """A decoder started from the pretrained export."""
    return build_decoder(vocab_size=pretrained.vocab_size, n_layers=1, max_seq_len=SEQ_LEN,
                         start_weights=pretrained.export, **kwargs)  # fmt: skip


def reversed_text_loader(pretrained, batch_size: int = 16) -> DataLoader:
    """Next-token windows over the corpus reversed character by character: a different task, same characters."""
    text = "".join(documents())[::-1]
    ids = torch.tensor(pretrained.tokenizer.encode(text))
    windows = ids[: len(ids) // (SEQ_LEN + 1) * (SEQ_LEN + 1)].view(-1, SEQ_LEN + 1)
    rows = [{"input_ids": w[:-1], "labels": w[1:]} for w in windows]
    return DataLoader(rows, batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip


def fine_tune(pretrained, callbacks, tmp_path, *, steps: int = 60, lr: float = 3e-3, sgd: bool = False,
              **trainer_kwargs):  # fmt: skip
    """Fine-tune a started model as CausalLM on the reversed text; returns the task and the logged metrics."""
    L.seed_everything(0)
    optimizer = torch.optim.SGD if sgd else torch.optim.AdamW
    task = CausalLM(start_model(pretrained), optimizer=lambda p: optimizer(p, lr=lr, weight_decay=0.0),
                    warmup_steps=0, schedule="constant")  # fmt: skip
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="logs")
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=logger, callbacks=callbacks, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path, **trainer_kwargs)  # fmt: skip
    trainer.fit(task, train_dataloaders=reversed_text_loader(pretrained))
    return task, read_metrics(logger.log_dir)


def read_metrics(log_dir) -> dict[str, list[float]]:
    """{metric: its logged values in order} from a CSVLogger folder."""
    import csv
    from pathlib import Path

    metrics: dict[str, list[float]] = {}
    with open(Path(log_dir) / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if value not in ("", None) and key not in ("step", "epoch"):
                    metrics.setdefault(key, []).append(float(value))
    return metrics
