"""PrefixLMDataModule: TextDataModule windows plus a per-example prefix length drawn from (seed, split, index)."""

import pickle

import pytest
import torch

from lightningllm.data import TextDataModule
from lightningllm.data.prefix import PrefixLMDataModule, PrefixWindows
from lightningllm.errors import ConfigError
from lightningllm.registry import get


def write_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: the quick brown fox jumps over the lazy dog. " * 30)
    return corpus


def datamodule(tmp_path, cls=PrefixLMDataModule, **kwargs):
    defaults = dict(corpus=str(write_corpus(tmp_path)), data_dir=str(tmp_path / "cache"), seq_len=16, batch_size=4,
                    val_documents=1)  # fmt: skip
    return cls(get("tokenizer", "CharTokenizer")(), **{**defaults, **kwargs})


class Indices(torch.utils.data.Dataset):
    """A stand-in window dataset: item i is ids i .. i + T - 1."""

    def __init__(self, n, T=8):
        self.n, self.T = n, T

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ids = torch.arange(i, i + self.T + 1)
        return {"input_ids": ids[:-1], "labels": ids[1:]}


def test_batches_are_the_text_windows_plus_prefix_lengths_in_range(tmp_path):
    data = datamodule(tmp_path, min_prefix=3, max_prefix=12)
    plain = datamodule(tmp_path, cls=TextDataModule)
    data.setup("fit")
    plain.setup("fit")
    for batch, plain_batch in zip(data.val_dataloader(), plain.val_dataloader()):
        assert set(batch) == {"input_ids", "labels", "prefix_lengths"}
        assert batch["prefix_lengths"].shape == (batch["input_ids"].shape[0],)
        assert batch["prefix_lengths"].dtype == torch.int64
        assert ((3 <= batch["prefix_lengths"]) & (batch["prefix_lengths"] <= 12)).all()
        assert torch.equal(batch["input_ids"], plain_batch["input_ids"])
        assert torch.equal(batch["labels"], plain_batch["labels"])
    train = next(iter(data.train_dataloader()))
    assert train["prefix_lengths"].shape == (4,) and train["input_ids"].shape == (4, 16)


def test_prefix_lengths_are_a_function_of_seed_split_and_index(tmp_path):
    def val_lengths(**kwargs):
        data = datamodule(tmp_path, **kwargs)
        data.setup("validate")
        return torch.cat([b["prefix_lengths"] for b in data.val_dataloader()])

    first = val_lengths()
    assert torch.equal(first, val_lengths())  # stable across evaluations
    assert torch.equal(first, val_lengths(batch_size=3))  # and batch sizes
    assert not torch.equal(first, val_lengths(seed=99))
    windows = Indices(200)
    val, train = PrefixWindows(windows, 1, 8, 0, "val"), PrefixWindows(windows, 1, 8, 0, "train")
    assert [val.prefix_length(i) for i in range(200)] != [train.prefix_length(i) for i in range(200)]
    # the same in a worker process: the dataset pickles and draws the same lengths
    assert [pickle.loads(pickle.dumps(val))[i]["prefix_lengths"].item() for i in range(20)] == [
        val.prefix_length(i) for i in range(20)
    ]


def test_prefix_lengths_are_uniform_over_the_range():
    windows = PrefixWindows(Indices(6000), 2, 7, 1234, "train")
    counts = torch.bincount(torch.tensor([windows.prefix_length(i) for i in range(len(windows))]), minlength=9)
    assert counts[:2].sum() == 0 and counts[8:].sum() == 0
    expected = len(windows) / 6  # six values, each 1000 times on average; binomial std ~ 29
    assert ((counts[2:8] - expected).abs() < 150).all(), counts


def test_prefix_length_is_capped_at_the_window_length():
    item = PrefixWindows(Indices(3, T=4), 6, 9, 0, "val")[0]
    assert item["prefix_lengths"].item() == 4


def test_max_prefix_defaults_to_seq_len_and_is_recorded(tmp_path):
    data = datamodule(tmp_path, min_prefix=0)
    assert (data.min_prefix, data.max_prefix) == (0, 16)
    assert data.hparams["min_prefix"] == 0 and data.hparams["max_prefix"] is None and data.hparams["seq_len"] == 16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(min_prefix=5, max_prefix=4), "min_prefix=5, max_prefix=4"),
        (dict(min_prefix=-1), "0 <= min_prefix"),
        (dict(max_prefix=17), "seq_len=16"),
        (dict(min_prefix=0.5), "min_prefix=0.5 is not allowed"),
    ],
)
def test_impossible_prefix_ranges_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        datamodule(tmp_path, **kwargs)
