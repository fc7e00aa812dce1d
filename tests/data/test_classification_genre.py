"""The Shakespeare genre task: the First Folio table, a play-disjoint stratified split, passages, atomic files."""

import json
from collections import Counter
from pathlib import Path

import pytest

from lightningllm.data.corpus import Document
from lightningllm.data.genre import (
    EXCLUDED,
    FIRST_FOLIO_GENRES,
    GENRES,
    ShakespeareGenreDataModule,
    passages,
    split_plays,
    write_genre_dataset,
)
from lightningllm.errors import ConfigError
from lightningllm.registry import get

CACHED_CORPUS = Path(__file__).parents[2] / ".cache" / "lightningllm" / "corpora" / "shakespeare"


def test_the_table_is_the_first_folio_catalogue():
    assert Counter(FIRST_FOLIO_GENRES.values()) == {"comedy": 14, "history": 10, "tragedy": 12}  # 36 plays
    assert FIRST_FOLIO_GENRES["troilus_and_cressida"] == FIRST_FOLIO_GENRES["cymbeline"] == "tragedy"
    assert FIRST_FOLIO_GENRES["winters_tale"] == "comedy" and FIRST_FOLIO_GENRES["henry_viii"] == "history"
    assert "pericles" in EXCLUDED and not set(EXCLUDED) & set(FIRST_FOLIO_GENRES)


@pytest.mark.skipif(not CACHED_CORPUS.is_dir(), reason="the Shakespeare corpus is not cached")
def test_every_document_of_the_corpus_is_placed_or_excluded():
    names = {p.stem for p in CACHED_CORPUS.glob("*.txt")}
    assert names == set(FIRST_FOLIO_GENRES) | set(EXCLUDED)


@pytest.mark.parametrize("seed", [0, 1, 1234])
def test_split_holds_out_whole_plays_with_every_genre_on_both_sides(seed):
    split = split_plays(list(FIRST_FOLIO_GENRES), val_fraction=0.25, seed=seed)
    assert not set(split["train"]) & set(split["val"])
    assert sorted(split["train"] + split["val"]) == sorted(FIRST_FOLIO_GENRES)
    for side in ("train", "val"):
        assert {FIRST_FOLIO_GENRES[p] for p in split[side]} == set(GENRES)
    assert Counter(FIRST_FOLIO_GENRES[p] for p in split["val"]) == {"comedy": 4, "history": 3, "tragedy": 3}
    assert split == split_plays(list(reversed(FIRST_FOLIO_GENRES)), val_fraction=0.25, seed=seed)


def test_seeds_choose_different_plays():
    held_out = {tuple(split_plays(list(FIRST_FOLIO_GENRES), 0.25, seed)["val"]) for seed in range(5)}
    assert len(held_out) > 1


def test_passages_start_at_the_first_act_and_are_evenly_capped():
    text = "HAMLET\nPersons: Hamlet.\n" + "ACT I.\n" + "".join(f"{i:04d}" for i in range(100))
    chunks = passages(text, 8, None)
    assert chunks[0] == "ACT I.\n0" and all(len(c) == 8 for c in chunks)
    assert "HAMLET" not in "".join(chunks)
    assert len(chunks) == (7 + 400) // 8
    capped = passages(text, 8, 5)
    assert capped == [chunks[(k * len(chunks)) // 5] for k in range(5)] and capped[0] == chunks[0]


def small_corpus() -> list[Document]:
    documents = [Document(name, f"Title {name}\nACT I.\n" + f"{genre} words of {name}. " * 40)
                 for name, genre in FIRST_FOLIO_GENRES.items()]  # fmt: skip
    return documents + [Document("sonnets", "Shall I compare thee " * 50), Document("pericles", "ACT I. " * 80)]


def test_files_are_written_once_atomically_and_match_the_split(tmp_path):
    folder = write_genre_dataset(tmp_path, passage_chars=50, passages_per_play=3, documents=small_corpus())
    assert sorted(p.name for p in folder.iterdir()) == ["plays.json", "train.jsonl", "val.jsonl"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    plays = json.loads((folder / "plays.json").read_text())
    for side in ("train", "val"):
        rows = [json.loads(line) for line in (folder / f"{side}.jsonl").read_text().splitlines()]
        assert {r["play"] for r in rows} == set(plays[side])
        assert all(r["label"] == FIRST_FOLIO_GENRES[r["play"]] and len(r["text"]) == 50 for r in rows)
        assert Counter(r["play"] for r in rows) == {p: 3 for p in plays[side]}
    assert "sonnets" not in plays["genres"] and "pericles" not in plays["genres"]
    stamp = (folder / "train.jsonl").stat().st_mtime_ns
    again = write_genre_dataset(tmp_path, passage_chars=50, passages_per_play=3, documents=small_corpus())
    assert again == folder and (folder / "train.jsonl").stat().st_mtime_ns == stamp
    other = write_genre_dataset(tmp_path, passage_chars=40, passages_per_play=3, documents=small_corpus())
    assert other != folder


def test_the_data_module_reads_the_written_files(tmp_path, monkeypatch):
    import lightningllm.data.genre as genre

    monkeypatch.setattr(genre, "load_shakespeare", lambda data_dir: small_corpus())
    tokenizer = get("tokenizer", "CharTokenizer")()
    data = ShakespeareGenreDataModule(tokenizer=tokenizer, data_dir=str(tmp_path), passage_chars=30,
                                      passages_per_play=2, batch_size=4)  # fmt: skip
    data.prepare_data()
    data.setup("fit")
    assert data.label_names == ["comedy", "history", "tragedy"]
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (4, 31)
    with pytest.raises(ConfigError, match="val_fraction=1.5"):
        ShakespeareGenreDataModule(tokenizer=tokenizer, val_fraction=1.5)
