import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lightningllm.data import TextDataModule
from lightningllm.errors import ConfigError, DataError
from lightningllm.tokenizer import SPECIAL_TOKENS, Tokenizer


class ByteTokenizer(Tokenizer):
    """Test-local tokenizer: the 5 special tokens, then one id per byte (``offset`` shifts the byte ids).

    ``train`` learns nothing but records what it saw, so tests can check what the tokenizer was trained on.
    """

    def __init__(self, vocab_size: int | None = None, path: str | None = None, offset: int = 0) -> None:
        super().__init__(vocab_size, path)
        self.offset = offset
        self.trained = False
        self.seen: list[str] = []
        self.encode_calls = 0
        self.train_calls = 0

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + self.offset + 256

    @property
    def is_trained(self) -> bool:
        return self.trained

    def token_to_id(self, token: str) -> int:
        return SPECIAL_TOKENS.index(token)

    def encode(self, text: str) -> list[int]:
        self.encode_calls += 1
        return [len(SPECIAL_TOKENS) + self.offset + b for b in text.encode()]

    def decode(self, ids) -> str:
        first = len(SPECIAL_TOKENS) + self.offset
        return bytes(int(i) - first for i in ids if int(i) >= first).decode(errors="replace")

    def train(self, texts, vocab_size=None) -> None:
        self.train_calls += 1
        self.seen = list(texts)
        self.trained = True

    def init_args(self) -> dict:
        return {**super().init_args(), "offset": self.offset}

    def _save_files(self, directory: Path) -> None:
        (directory / "bytes.json").write_text(json.dumps({"offset": self.offset}))

    def _load_files(self, directory: Path) -> None:
        self.offset = json.loads((directory / "bytes.json").read_text())["offset"]
        self.trained = True


class FlakyTokenizer(ByteTokenizer):
    """Raises on the ``fail_at``-th document it encodes (None: never)."""

    fail_at: int | None = 2

    def encode(self, text: str) -> list[int]:
        if self.fail_at is not None and self.encode_calls + 1 >= self.fail_at:
            raise RuntimeError("tokenizer crashed")
        return super().encode(text)


PLAYS = {
    f"play_{i:02d}.txt": f"<{i:02d}> " + " ".join(f"w{i}_{j}" for j in range(20 + 7 * i)) + "\n" for i in range(10)
}


def _corpus(tmp_path: Path, docs: dict[str, str] = PLAYS) -> str:
    root = tmp_path / "corpus"
    root.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (root / name).write_text(text)
    return str(root)


def _datamodule(tmp_path: Path, tokenizer: Tokenizer | None = None, **kwargs) -> TextDataModule:
    if "corpus" not in kwargs:
        kwargs["corpus"] = _corpus(tmp_path)
    kwargs.setdefault("batch_size", 2)
    return TextDataModule(tokenizer or ByteTokenizer(), data_dir=str(tmp_path / "cache"), **kwargs)


def _stream(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    """The expected token stream: each document's ids followed by EOS."""
    out: list[int] = []
    for text in texts:
        out += tokenizer.encode(text) + [tokenizer.eos_id]
    return out


def _split_names(dm: TextDataModule, split: str) -> list[str]:
    return json.loads((dm.cache_dir / "meta.json").read_text())["splits"][split]["documents"]


def test_vocab_size_works_right_after_init_and_trains_on_training_documents_only(tmp_path):
    dm = _datamodule(tmp_path, val_documents=3)
    assert dm.vocab_size == 261 and dm.tokenizer.train_calls == 1
    assert (dm.cache_dir / "tokenizer" / "tokenizer_config.json").is_file()
    dm.prepare_data()
    val = _split_names(dm, "val")
    assert len(val) == 3 and set(val) <= set(PLAYS)
    assert sorted(dm.tokenizer.seen) == sorted(PLAYS[name] for name in PLAYS if name not in val)


@pytest.mark.parametrize(("seq_len", "stride"), [(7, None), (7, 3), (5, 11), (1, 1), (16, 16)])
def test_windows_match_the_token_stream(tmp_path, seq_len, stride):
    dm = _datamodule(tmp_path, seq_len=seq_len, stride=stride, val_documents=2)
    dm.setup("fit")
    val = _split_names(dm, "val")
    reference = ByteTokenizer()
    for split, names in [("train", [n for n in sorted(PLAYS) if n not in val]), ("val", sorted(val))]:
        stream = _stream(reference, [PLAYS[name] for name in names])
        step = stride or seq_len
        starts = list(range(0, len(stream) - seq_len, step))  # every start with seq_len + 1 tokens left
        dataset = dm.datasets[split]
        assert len(dataset) == len(starts)
        for index, start in enumerate(starts):
            item = dataset[index]
            assert item["input_ids"].dtype == torch.int64
            assert item["input_ids"].tolist() == stream[start : start + seq_len]
            assert item["labels"].tolist() == stream[start + 1 : start + seq_len + 1]
        with pytest.raises(IndexError):
            dataset[len(starts)]


def test_eos_follows_every_document(tmp_path):
    dm = _datamodule(tmp_path, val_documents=2)
    dm.prepare_data()
    meta = json.loads((dm.cache_dir / "meta.json").read_text())
    assert meta["dtype"] == "uint16"
    for split in ("train", "val"):
        tokens = np.fromfile(dm.cache_dir / f"{split}.bin", dtype=np.uint16)
        assert len(tokens) == meta["splits"][split]["tokens"]
        eos = np.flatnonzero(tokens == dm.tokenizer.eos_id)
        assert eos[-1] == len(tokens) - 1
        pieces = np.split(tokens, eos + 1)[:-1]
        texts = [dm.tokenizer.decode(piece[:-1].tolist()) for piece in pieces]
        assert texts == [PLAYS[name] for name in meta["splits"][split]["documents"]]


def test_validation_holds_out_whole_documents(tmp_path):
    dm = _datamodule(tmp_path, val_documents=0.25, test_documents=2, seq_len=8)
    dm.setup()
    train, val, test = (_split_names(dm, split) for split in ("train", "val", "test"))
    assert len(val) == round(0.25 * len(PLAYS)) and len(test) == 2
    assert sorted(train + val + test) == sorted(PLAYS)
    train_text = dm.tokenizer.decode(np.fromfile(dm.cache_dir / "train.bin", dtype=np.uint16).tolist())
    for name in val + test:
        marker = PLAYS[name].split()[0]  # "<03>" appears in that document only
        assert marker not in train_text and marker not in "".join(dm.tokenizer.seen)
    assert (dm.cache_dir / "test.bin").is_file()


def test_holdout_is_seeded(tmp_path):
    holdouts = []
    for seed in (1, 1, 2, 3, 4):
        dm = _datamodule(tmp_path / f"seed{len(holdouts)}", val_documents=2, seed=seed)
        dm.prepare_data()
        holdouts.append(tuple(_split_names(dm, "val")))
    assert holdouts[0] == holdouts[1]
    assert len(set(holdouts)) > 1


def test_test_split_defaults_to_validation(tmp_path):
    dm = _datamodule(tmp_path, seq_len=8)
    dm.setup("test")
    assert _split_names(dm, "test") == _split_names(dm, "val") and len(_split_names(dm, "val")) == 1
    assert not (dm.cache_dir / "test.bin").exists()
    assert (
        next(iter(dm.test_dataloader()))["input_ids"].tolist() == next(iter(dm.val_dataloader()))["input_ids"].tolist()
    )


def test_single_document_holds_out_its_tail(tmp_path):
    text = "".join(f"line {i}\n" for i in range(60))
    (tmp_path / "one.txt").write_text(text)
    dm = _datamodule(tmp_path, corpus=str(tmp_path / "one.txt"), val_documents=0.2, seq_len=4)
    dm.setup("fit")
    cut = round(len(text) * 0.8)
    reference = ByteTokenizer()
    for split, part in [("train", text[:cut]), ("val", text[cut:])]:
        tokens = np.fromfile(dm.cache_dir / f"{split}.bin", dtype=np.uint16).tolist()
        assert tokens == _stream(reference, [part])
    assert dm.tokenizer.seen == [text[:cut]]


def test_batches_and_train_order(tmp_path):
    def first_epoch(seed: int, data_dir: str) -> list[list[list[int]]]:
        dm = _datamodule(tmp_path / data_dir, seq_len=6, stride=4, batch_size=3, seed=seed)
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        n_windows = len(dm.datasets["train"])
        assert len(batches) == n_windows // 3  # drop_last
        for batch in batches:
            assert set(batch) == {"input_ids", "labels"}
            assert batch["input_ids"].shape == batch["labels"].shape == (3, 6)
            assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
            assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
        val = torch.cat([b["input_ids"] for b in dm.val_dataloader()])
        expected = torch.stack([dm.datasets["val"][i]["input_ids"] for i in range(len(dm.datasets["val"]))])
        assert torch.equal(val, expected)  # validation keeps its order and every window
        return [b["input_ids"].tolist() for b in batches]

    same = first_epoch(7, "a")
    assert same == first_epoch(7, "b")
    assert same != first_epoch(8, "c")
    in_order = [row for batch in same for row in batch]
    dm = _datamodule(tmp_path / "a", seq_len=6, stride=4, batch_size=3, seed=7)
    dm.setup("fit")
    sequential = [dm.datasets["train"][i]["input_ids"].tolist() for i in range(len(dm.datasets["train"]))]
    assert in_order != sequential[: len(in_order)]


def test_cache_is_reused_without_tokenising_again(tmp_path):
    first = _datamodule(tmp_path, seq_len=8)
    first.setup("fit")
    assert first.tokenizer.encode_calls == len(PLAYS)
    files = sorted(p for p in first.cache_dir.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"train.bin", "val.bin", "meta.json", "tokenizer_config.json"}
    stamps = {p: p.stat().st_mtime_ns for p in files}

    second = _datamodule(tmp_path, seq_len=8)
    assert second.vocab_size == first.vocab_size
    second.prepare_data()
    second.setup("fit")
    assert second.cache_dir == first.cache_dir
    assert second.tokenizer.encode_calls == 0 and second.tokenizer.train_calls == 0 and second.tokenizer.is_trained
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert sorted(p for p in second.cache_dir.rglob("*") if p.is_file()) == files
    assert torch.equal(second.datasets["train"][3]["input_ids"], first.datasets["train"][3]["input_ids"])

    other = _datamodule(tmp_path, tokenizer=ByteTokenizer(offset=3), seq_len=8)
    other.prepare_data()
    assert other.cache_dir != first.cache_dir and other.tokenizer.encode_calls == len(PLAYS)


def test_failed_tokenisation_leaves_no_token_files(tmp_path, monkeypatch):
    dm = _datamodule(tmp_path, tokenizer=FlakyTokenizer(), seq_len=8)
    with pytest.raises(RuntimeError, match="crashed"):
        dm.prepare_data()
    leftovers = sorted(p.name for p in dm.cache_dir.iterdir())
    assert leftovers == ["tokenizer"]  # no .bin, no meta.json, no temporary file

    monkeypatch.setattr(FlakyTokenizer, "fail_at", None)
    retry = _datamodule(tmp_path, tokenizer=FlakyTokenizer(), seq_len=8)
    retry.setup("fit")
    assert retry.cache_dir == dm.cache_dir and retry.tokenizer.train_calls == 0
    val = _split_names(retry, "val")
    stream = _stream(ByteTokenizer(), [PLAYS[name] for name in sorted(PLAYS) if name not in val])
    assert np.fromfile(retry.cache_dir / "train.bin", dtype=np.uint16).tolist() == stream


def test_large_vocabulary_uses_uint32(tmp_path):
    dm = _datamodule(tmp_path, tokenizer=ByteTokenizer(offset=70_000), seq_len=8)
    dm.setup("fit")
    meta = json.loads((dm.cache_dir / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and dm.vocab_size == 70_261
    assert dm.tokenizer.decode(dm.datasets["train"][0]["input_ids"].tolist()) == PLAYS[_split_names(dm, "train")[0]][:8]


def test_dataset_pickles_without_its_memory_map_and_loads_in_workers(tmp_path):
    dm = _datamodule(tmp_path, seq_len=8, num_workers=1)
    dm.setup("fit")
    dataset = dm.datasets["val"]
    before = dataset[0]
    assert dataset._tokens is not None
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._tokens is None and torch.equal(copy[0]["input_ids"], before["input_ids"])
    batches = list(dm.val_dataloader())
    assert torch.equal(batches[0]["input_ids"][0], before["input_ids"])


@pytest.mark.parametrize(
    ("kwargs", "value"),
    [
        ({"seq_len": 0}, "seq_len=0"),
        ({"seq_len": 2.5}, "seq_len=2.5"),
        ({"stride": 0}, "stride=0"),
        ({"batch_size": -1}, "batch_size=-1"),
        ({"num_workers": -2}, "num_workers=-2"),
        ({"val_documents": 0}, "val_documents=0"),
        ({"val_documents": 1.0}, "val_documents=1.0"),
        ({"test_documents": 1.5}, "test_documents=1.5"),
    ],
)
def test_invalid_settings_are_config_errors(tmp_path, kwargs, value):
    with pytest.raises(ConfigError, match=value):
        _datamodule(tmp_path, **kwargs)


def test_corpus_too_short_for_one_window(tmp_path):
    dm = _datamodule(tmp_path, seq_len=10_000)
    with pytest.raises(DataError, match="seq_len=10000") as err:
        dm.setup("fit")
    val = _split_names(dm, "val")
    n_train = len(_stream(ByteTokenizer(), [PLAYS[name] for name in sorted(PLAYS) if name not in val]))
    assert f"has {n_train} tokens" in str(err.value) and "10001" in str(err.value)


def test_too_few_windows_for_a_batch(tmp_path):
    dm = _datamodule(tmp_path, seq_len=200, batch_size=64)
    with pytest.raises(DataError, match="batch_size=64"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("corpus", "message"),
    [("missing", "does not exist"), ("empty", "is empty"), ("latin1", "byte offset 3")],
)
def test_bad_corpus_is_a_data_error_naming_the_path(tmp_path, corpus, message):
    root = tmp_path / corpus
    if corpus != "missing":
        root.mkdir()
    if corpus == "latin1":
        (root / "a.txt").write_bytes("caf\u00e9".encode("latin-1"))
    dm = _datamodule(tmp_path, corpus=str(root))
    with pytest.raises(DataError, match=message) as err:
        _ = dm.vocab_size
    assert corpus in str(err.value)


def test_too_few_documents_for_the_holdout(tmp_path):
    corpus = _corpus(tmp_path, {"a.txt": "alpha", "b.txt": "beta"})
    with pytest.raises(DataError, match="2 documents"):
        _ = _datamodule(tmp_path, corpus=corpus, val_documents=1, test_documents=1).vocab_size


def test_with_registered_char_tokenizer(tmp_path):
    from lightningllm.registry import available, get

    if "CharTokenizer" not in available("tokenizer"):
        pytest.skip("CharTokenizer is not registered yet")
    dm = _datamodule(tmp_path, tokenizer=get("tokenizer", "CharTokenizer")(), seq_len=12, val_documents=2)
    assert dm.vocab_size == dm.tokenizer.vocab_size > len(SPECIAL_TOKENS)
    dm.setup("fit")
    val = _split_names(dm, "val")
    stream = _stream(dm.tokenizer, [PLAYS[name] for name in sorted(PLAYS) if name not in val])
    assert dm.datasets["train"][2]["input_ids"].tolist() == stream[24:36]
    if dm.tokenizer.lossless:
        first = sorted(set(PLAYS) - set(val))[0]
        assert dm.tokenizer.decode(dm.datasets["train"][0]["input_ids"].tolist()) == PLAYS[first][:12]
    again = _datamodule(tmp_path, tokenizer=get("tokenizer", "CharTokenizer")(), seq_len=12, val_documents=2)
    again.setup("fit")
    assert again.tokenizer.encode("w3_4") == dm.tokenizer.encode("w3_4")


def _rows(batches) -> list[list[int]]:
    return [row for batch in batches for row in (batch["input_ids"] if isinstance(batch, dict) else batch).tolist()]


def test_ranks_shard_one_order_so_two_ranks_see_the_batches_of_one_with_twice_the_batch():
    from lightningllm.data.resumable import ResumableDataLoader, ResumableSampler

    data = torch.arange(40).unsqueeze(1)  # 40 samples, each its own index

    def loader(batch_size, num_replicas, rank):
        sampler = ResumableSampler(data, seed=5, num_replicas=num_replicas, rank=rank)
        return ResumableDataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=True)

    one, ranks = loader(8, 1, 0), [loader(4, 2, r) for r in (0, 1)]
    orders = []
    for epoch in (0, 1):  # set_epoch reshuffles, identically on every rank
        for dl in (one, *ranks):
            dl.sampler.set_epoch(epoch)
        single = [sorted(b.flatten().tolist()) for b in one]
        union = [sorted(a.flatten().tolist() + b.flatten().tolist()) for a, b in zip(*ranks)]
        assert single == union and len(single) == 5
        orders.append(sum(single, []))
    assert sorted(orders[0]) == list(range(40)) and orders[0] != list(range(40))  # every sample, shuffled
    assert orders[0] != orders[1]


def test_train_loader_resumes_mid_epoch_from_its_state(tmp_path):
    dm = _datamodule(tmp_path, seq_len=6, stride=4, batch_size=3, seed=7)
    dm.setup("fit")
    epoch = list(dm.train_dataloader())
    length = len(epoch)
    assert length >= 4

    stopped = dm.train_dataloader()
    stopped.sampler.set_epoch(0)
    iterator = iter(stopped)
    done = [next(iterator) for _ in range(2)]
    state = stopped.state_dict()
    assert state == {"epoch": 0, "samples": 6}

    resumed = dm.train_dataloader()  # a fresh loader, as after a restart
    resumed.load_state_dict(state)
    assert len(resumed) == length  # Lightning counts the done batches itself: len stays the epoch's
    rest = list(resumed)
    assert _rows(done + rest) == _rows(epoch)
    assert resumed.state_dict() == {"epoch": 0, "samples": 3 * length}
    assert _rows(resumed) == _rows(epoch)  # the next iteration starts at the epoch's beginning again

    at_end = dm.train_dataloader()
    at_end.load_state_dict({"epoch": 0, "samples": 3 * length})  # saved on the epoch's last batch
    at_end.sampler.set_epoch(1)
    assert len(list(at_end)) == length  # the next epoch is whole


def test_a_sampler_built_before_the_process_group_shards_over_it(monkeypatch):
    import lightningllm.data.resumable as resumable

    sampler = resumable.ResumableSampler(list(range(10)), shuffle=False)  # e.g. train_dataloader() before fit
    assert len(sampler) == 10
    monkeypatch.setattr(resumable, "_group", lambda: (2, 1))  # then DDP starts: rank 1 of 2
    assert len(sampler) == 5 and list(sampler) == [1, 3, 5, 7, 9]
    fixed = resumable.ResumableSampler(list(range(10)), shuffle=False, num_replicas=1, rank=0)
    assert list(fixed) == list(range(10))  # explicit sizes are kept
