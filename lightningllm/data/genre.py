"""The built-in classification task: which genre (comedy, history, tragedy) is the play a Shakespeare passage is from.

Nothing is downloaded beyond the corpus the pretraining demo already caches. Passages of held-out plays
are scored, so the task asks whether a model learnt what comedies, histories and tragedies sound like,
not which play a line belongs to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from pathlib import Path

from lightningllm.atomic import atomic_directory
from lightningllm.data.classification import ClassificationDataModule, Truncation
from lightningllm.data.corpus import Document, corpus_fingerprint, load_shakespeare
from lightningllm.errors import ConfigError, DataError
from lightningllm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

GENRES = ("comedy", "history", "tragedy")
DATASET_FORMAT = 1  # bump when the passages or the split of a given configuration change

# The genre of each play as the catalogue of the First Folio (London, 1623, "Mr. William Shakespeares Comedies,
# Histories, & Tragedies") groups them, keyed by the corpus file name. Two placements of the Folio differ from
# later habit and are kept: Troilus and Cressida, printed unpaginated between the histories and the tragedies
# (and absent from the catalogue), stands with the tragedies, where its text is; Cymbeline closes the tragedies.
# Pericles is not in the Folio (nor is The Two Noble Kinsmen, which this corpus does not hold), so the source
# gives it no genre and it is left out rather than assigned one. The poems of the corpus (the Sonnets, The Rape of
# Lucrece, A Lover's Complaint, The Passionate Pilgrim, The Phoenix and the Turtle) are not plays: left out too.
FIRST_FOLIO_GENRES: dict[str, str] = {
    # Comedies, in the catalogue's order
    "tempest": "comedy",
    "two_gentlemen_of_verona": "comedy",
    "merry_wives_of_windsor": "comedy",
    "measure_for_measure": "comedy",
    "comedy_of_errors": "comedy",
    "much_ado_about_nothing": "comedy",
    "loves_labours_lost": "comedy",
    "midsummer_nights_dream": "comedy",
    "merchant_of_venice": "comedy",
    "as_you_like_it": "comedy",
    "taming_of_the_shrew": "comedy",
    "alls_well_that_ends_well": "comedy",
    "twelfth_night": "comedy",
    "winters_tale": "comedy",
    # Histories
    "john": "history",
    "richard_ii": "history",
    "henry_iv_part_1": "history",
    "henry_iv_part_2": "history",
    "henry_v": "history",
    "henry_vi_part_1": "history",
    "henry_vi_part_2": "history",
    "henry_vi_part_3": "history",
    "richard_iii": "history",
    "henry_viii": "history",
    # Tragedies
    "troilus_and_cressida": "tragedy",
    "coriolanus": "tragedy",
    "tragedy_of_titus_andronicus": "tragedy",
    "romeo_and_juliet": "tragedy",
    "timon_of_athens": "tragedy",
    "julius_caesar": "tragedy",
    "macbeth": "tragedy",
    "hamlet": "tragedy",
    "lear": "tragedy",
    "othello": "tragedy",
    "antony_and_cleopatra": "tragedy",
    "cymbeline": "tragedy",
}
EXCLUDED = {
    "pericles": "not in the First Folio",
    "lovers_complaint": "a poem",
    "passionate_pilgrim": "a poem",
    "phoenix_and_the_turtle": "a poem",
    "rape_of_lucrece": "a poem",
    "sonnets": "poems",
}
# The play proper starts at its first act heading ("ACT I.", "ACT FIRST.", "Act I.", "ACT 1"); the title page
# and the list of persons before it name the play and are left out of the passages.
_FIRST_ACT = re.compile(r"^(?:ACT|Act) (?:I|1|FIRST)\b", re.MULTILINE)


def split_plays(plays: list[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """Hold out whole plays, stratified by genre: no play is in both splits and every genre is in both.

    Per genre, the sorted play names are shuffled with ``seed`` and the first ``round(val_fraction * n)``
    (at least 1, at most n - 1) are held out.

    Args:
        plays: play names, each a key of :data:`FIRST_FOLIO_GENRES`.
        val_fraction: share of each genre's plays held out, in (0, 1).
        seed: the shuffle's seed.

    Returns:
        ``{"train": [...], "val": [...]}``, each sorted.
    """
    split: dict[str, list[str]] = {"train": [], "val": []}
    for genre in GENRES:
        members = sorted(p for p in plays if FIRST_FOLIO_GENRES[p] == genre)
        if len(members) < 2:
            raise DataError(
                f"The corpus holds {len(members)} {genre} play(s): holding out whole plays needs at least two per "
                f"genre, one to train on and one to evaluate on. Use the complete shakespeare corpus."
            )
        random.Random(f"{seed}-{genre}").shuffle(members)
        n_val = min(max(int(val_fraction * len(members) + 0.5), 1), len(members) - 1)
        split["val"] += members[:n_val]
        split["train"] += members[n_val:]
    return {name: sorted(plays) for name, plays in split.items()}


def passages(text: str, passage_chars: int, limit: int | None) -> list[str]:
    """Consecutive non-overlapping ``passage_chars``-character passages of a play, from its first act on.

    The incomplete tail is dropped. With ``limit``, ``limit`` passages evenly spaced over the play are kept
    (all of them when it has fewer), so a capped play is still sampled from beginning to end.
    """
    match = _FIRST_ACT.search(text)
    body = text[match.start() :] if match else text
    chunks = [body[i : i + passage_chars] for i in range(0, len(body) - passage_chars + 1, passage_chars)]
    if limit is None or len(chunks) <= limit:
        return chunks
    return [chunks[(k * len(chunks)) // limit] for k in range(limit)]


def write_genre_dataset(
    data_dir: str | os.PathLike,
    *,
    passage_chars: int = 127,
    passages_per_play: int | None = 100,
    val_fraction: float = 0.25,
    seed: int = 1234,
    documents: list[Document] | None = None,
) -> Path:
    """Write ``train.jsonl``, ``val.jsonl`` and ``plays.json`` of the genre task once, under ``data_dir``.

    The folder is ``<data_dir>/classification/shakespeare-genre-<key>/`` (``key`` hashes the corpus and the
    arguments) and appears atomically, complete or not at all; an existing one is reused. Each JSONL line is
    ``{"text": passage, "label": genre, "play": name}``; ``plays.json`` records the split.

    Args:
        data_dir: the cache root (the corpus is read from ``<data_dir>/corpora/shakespeare/``).
        passage_chars: characters per passage.
        passages_per_play: passages kept per play, evenly spaced (None: all), so long plays do not dominate.
        val_fraction: share of each genre's plays held out for validation.
        seed: seed of the split.
        documents: the corpus (tests pass a small one); None loads the built-in Shakespeare corpus.
    """
    documents = load_shakespeare(data_dir) if documents is None else documents
    plays = {d.name: d.text for d in documents if d.name in FIRST_FOLIO_GENRES}
    settings = {"format": DATASET_FORMAT, "passage_chars": passage_chars, "passages_per_play": passages_per_play,
                "val_fraction": val_fraction, "seed": seed}  # fmt: skip
    identity = {**settings, "corpus": corpus_fingerprint(documents)}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    target = Path(data_dir) / "classification" / f"shakespeare-genre-{key}"
    if (target / "plays.json").is_file():
        return target
    split = split_plays(list(plays), val_fraction, seed)
    with atomic_directory(target) as staging:
        for name, members in split.items():
            lines = [
                json.dumps({"text": passage, "label": FIRST_FOLIO_GENRES[play], "play": play})
                for play in members
                for passage in passages(plays[play], passage_chars, passages_per_play)
            ]
            (staging / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        genres = {play: FIRST_FOLIO_GENRES[play] for play in sorted(plays)}
        (staging / "plays.json").write_text(json.dumps({**settings, **split, "genres": genres}, indent=2) + "\n")
    log.info("Wrote the genre task (%d train, %d val plays) to %s", len(split["train"]), len(split["val"]), target)
    return target


class ShakespeareGenreDataModule(ClassificationDataModule):
    """Classify a passage of Shakespeare by the First Folio genre of its play; validation plays are never trained on.

    The passages are written once by :func:`write_genre_dataset` under ``<data_dir>/classification/`` and then read
    as any :class:`~lightningllm.data.ClassificationDataModule` reads JSONL files (classes: comedy, history,
    tragedy). Tests and predictions use the validation plays.

    Args:
        tokenizer: a tokenizer plugin (trained on the training passages if it is not trained yet).
        tokenizer_dir: the export folder of the model being fine-tuned; exactly one of the two.
        data_dir: the cache root shared with the pretraining data.
        passage_chars: characters per passage.
        passages_per_play: passages kept per play, evenly spaced (None: all).
        val_fraction: share of each genre's plays held out.
        max_length: tokens per row at most, ``<bos>`` included.
        truncation: which end of a long passage loses tokens.
        batch_size: rows per batch.
        num_workers: DataLoader worker processes.
        seed: seed of the play split and of the training order.
    """

    def __init__(
        self,
        tokenizer: Tokenizer | None = None,
        tokenizer_dir: str | None = None,
        data_dir: str = ".cache/lightningllm",
        passage_chars: int = 127,
        passages_per_play: int | None = 100,
        val_fraction: float = 0.25,
        max_length: int = 128,
        truncation: Truncation = "right",
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 1234,
    ) -> None:
        if isinstance(passage_chars, bool) or not isinstance(passage_chars, int) or passage_chars < 1:
            raise ConfigError(f"ShakespeareGenreDataModule passage_chars={passage_chars!r} must be an integer >= 1.")
        if passages_per_play is not None and (not isinstance(passages_per_play, int) or passages_per_play < 1):
            raise ConfigError(
                f"ShakespeareGenreDataModule passages_per_play={passages_per_play!r} must be an integer >= 1, or null "
                "for every passage."
            )
        if not isinstance(val_fraction, float) or not 0.0 < val_fraction < 1.0:
            raise ConfigError(
                f"ShakespeareGenreDataModule val_fraction={val_fraction!r} must be a float strictly between 0 and 1: "
                "the share of each genre's plays held out."
            )
        super().__init__(
            tokenizer=tokenizer, tokenizer_dir=tokenizer_dir, labels=list(GENRES), max_length=max_length,
            truncation=truncation, batch_size=batch_size, num_workers=num_workers, seed=seed,
        )  # fmt: skip
        self.data_dir = data_dir
        self.passage_chars, self.passages_per_play, self.val_fraction = passage_chars, passages_per_play, val_fraction
        self._folder: Path | None = None

    def prepare_data(self) -> None:
        self.resolved_files()

    def resolved_files(self) -> dict[str, str | None]:
        if self._folder is None:
            self._folder = write_genre_dataset(
                self.data_dir, passage_chars=self.passage_chars, passages_per_play=self.passages_per_play,
                val_fraction=self.val_fraction, seed=self.seed,
            )  # fmt: skip
        val = str(self._folder / "val.jsonl")
        return {"train": str(self._folder / "train.jsonl"), "val": val, "test": val, "predict": val}
