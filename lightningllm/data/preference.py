"""PreferenceDataModule: ranked completions of a prompt (pairs are rankings of two), or unpaired labelled ones.

Records are JSON lines, one of

- ``{"prompt", "chosen", "rejected"}``: a pair (what ``lightningllm label`` writes);
- ``{"prompt", "responses": [...], "ranking": [...]}``: K completions and each one's rank (0 = best, ties allowed);
- ``{"prompt", "completion", "label": true|false}``: one completion, desirable or not (KTO's unpaired data).

Pairs and rankings feed the reward model and the paired preference losses; with ``unpaired: true`` every record
becomes labelled completions (a pair's chosen desirable, its rejected not; a ranking's best desirable, the rest not).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightningllm.alignment.logprobs import pad_pairs
from lightningllm.checks import check_int, check_number
from lightningllm.data.resumable import resumable_loader
from lightningllm.errors import DataError
from lightningllm.hparams import save_hyperparameters
from lightningllm.prompt import PromptTemplate
from lightningllm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMS = (
    "a pair {prompt, chosen, rejected}, a ranking {prompt, responses: [...], ranking: [rank of each, 0 = best]}, or "
    "an unpaired completion {prompt, completion, label: true|false}"
)


@dataclass(frozen=True)
class Ranked:
    """A prompt's K completions (token ids) and their ranks (0 = best)."""

    prompt: list[int]
    completions: list[list[int]]
    ranks: list[int]


@dataclass(frozen=True)
class Labelled:
    """One completion of a prompt, desirable or not."""

    prompt: list[int]
    completion: list[int]
    desirable: bool


def parse_record(record: object, where: str) -> tuple[str, list[str], list[int]] | tuple[str, str, bool]:
    """``(prompt, responses, ranks)`` of a pair or ranking, ``(prompt, completion, desirable)`` of an unpaired one.

    Raises:
        DataError: the record is none of the three forms; the paragraph names ``where`` and what is missing.
    """
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: a record with {keys} has no string 'prompt'; each record is {FORMS}.")
    if "responses" in record or "ranking" in record:
        responses, ranking = record.get("responses"), record.get("ranking")
        ok = isinstance(responses, list) and isinstance(ranking, list) and len(responses) == len(ranking) >= 2
        ok = ok and all(isinstance(r, str) for r in responses)
        if not ok or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranking):
            raise DataError(
                f"{where}: 'responses' must be a list of at least two strings and 'ranking' a list of as many integer "
                f"ranks >= 0 (0 = best); got responses={responses!r}, ranking={ranking!r}."
            )
        return record["prompt"], responses, ranking
    if "completion" in record or "label" in record:
        completion, label = record.get("completion"), record.get("label")
        if not isinstance(completion, str) or not isinstance(label, bool):
            raise DataError(
                f"{where}: an unpaired record needs a string 'completion' and a boolean 'label' (true: desirable); "
                f"got completion={completion!r}, label={label!r}."
            )
        return record["prompt"], completion, label
    missing = [key for key in ("chosen", "rejected") if not isinstance(record.get(key), str)]
    if missing:
        raise DataError(
            f"{where}: the record lacks a string {' and '.join(repr(k) for k in missing)} (its keys: "
            f"{sorted(record)}); each record is {FORMS}."
        )
    return record["prompt"], [record["chosen"], record["rejected"]], [0, 1]


def read_preferences(path: str | Path) -> list[tuple]:
    """The parsed records of a JSON-lines file (blank lines skipped), in file order.

    Raises:
        DataError: a missing file, a line that is not JSON, a record of no known form, or no record at all.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"Preference data {str(path)!r} does not exist; give a JSON-lines file of records: {FORMS}.")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            record = json.loads(line)
        except ValueError as err:
            raise DataError(f"{where} is not valid JSON ({err}); each line must hold one JSON object.") from None
        records.append(parse_record(record, where))
    if not records:
        raise DataError(f"Preference data {str(path)!r} holds no record; write one JSON object per line.")
    return records


class PreferenceDataModule(L.LightningDataModule):
    """Preference data tokenised as prompt + completion rows, the completion rows of a prompt in one batch.

    Each completion is rendered as the assistant's reply to the prompt by ``template`` (its tokens and end-of-turn
    are the completion; None: the prompt's tokens, then the completion's, then ``eos``). Batches:

    - ranked (pairs, rankings): ``input_ids``, ``attention_mask``, ``completion_mask`` (B * K, T), the K rows of
      prompt b at ``b * K .. b * K + K - 1`` (a pair: chosen then rejected), ``ranks`` (B, K) and ``index`` (B,);
    - unpaired: the same (B, T) tensors, ``desirable`` (B,) bool, ``index`` (B,), and ``kl_input_ids``,
      ``kl_attention_mask``, ``kl_completion_mask``: prompt b with the completion of row b + 1 (mod B), the
      mismatched pairs whose log-ratio estimates KTO's reference point.

    ``index`` numbers the examples of a split, so a task can cache per-example values (reference log-probabilities).

    Args:
        tokenizer_dir: a folder holding a saved tokenizer (the start export's).
        train: a JSON-lines file of records (see the module docstring).
        val: a JSON-lines file; None holds out ``val_fraction`` of ``train``.
        val_fraction: the share of ``train`` held out when ``val`` is None (0: no validation).
        template: a built-in prompt template (``chat``, ``alpaca``), a ``.jinja`` path, or None (plain concatenation).
        unpaired: give labelled single completions (KTO) instead of rankings.
        seq_len: the most tokens of a prompt + completion row; a longer one is refused.
        batch_size: prompts (ranked) or completions (unpaired) per batch.
        seed: the held-out split and the training order.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        tokenizer_dir: str,
        train: str,
        val: str | None = None,
        val_fraction: float = 0.1,
        template: str | None = "chat",
        unpaired: bool = False,
        seq_len: int = 128,
        batch_size: int = 16,
        seed: int = 1337,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        owner = "PreferenceDataModule"
        check_int(owner, "seq_len", seq_len, minimum=2)
        check_int(owner, "batch_size", batch_size, minimum=1)
        check_int(owner, "num_workers", num_workers, minimum=0)
        check_number(owner, "val_fraction", val_fraction, 0.0, 1.0, high_open=True)
        save_hyperparameters(self, injected=())
        self.tokenizer: Tokenizer = Tokenizer.load(tokenizer_dir)
        self.template = PromptTemplate(template) if template is not None else None
        self.train_source, self.val_source, self.val_fraction = train, val, val_fraction
        self.unpaired, self.seq_len, self.batch_size = unpaired, seq_len, batch_size
        self.seed, self.num_workers = seed, num_workers
        self.datasets: dict[str, list[tuple[int, Ranked | Labelled]]] = {}

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (linked to the model's by the CLI)."""
        return self.tokenizer.vocab_size

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        train = read_preferences(self.train_source)
        if self.val_source is not None:
            val = read_preferences(self.val_source)
        else:
            order = list(range(len(train)))
            random.Random(self.seed).shuffle(order)
            n_val = round(len(train) * self.val_fraction) if self.val_fraction > 0 else 0
            n_val = min(max(n_val, 1 if self.val_fraction > 0 else 0), len(train) - 1)
            val, train = [train[i] for i in sorted(order[:n_val])], [train[i] for i in sorted(order[n_val:])]
        for split, records in (("train", train), ("val", val)):
            self.datasets[split] = self._examples(records, split)
            log.info("%d %s preference examples", len(self.datasets[split]), split)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        dataset = self.datasets["train"]
        return resumable_loader(dataset, min(self.batch_size, len(dataset)), shuffle=True, seed=self.seed,
                                drop_last=True, collate_fn=self._collate(), **self._workers())  # fmt: skip

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if not self.datasets["val"]:
            return []
        return DataLoader(self.datasets["val"], self.batch_size, collate_fn=self._collate(), **self._workers())

    # --- tokenising ------------------------------------------------------------------------------
    def encode(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids) of one completion as the assistant's reply."""
        return encode_completion(self.tokenizer, self.template, prompt, completion)

    def _examples(self, records: list[tuple], split: str) -> list[tuple[int, Ranked | Labelled]]:
        examples = []
        for number, (prompt, responses, marks) in enumerate(records, start=1):
            where = f"{split} record {number}"
            if isinstance(responses, str):  # unpaired
                examples.append(Labelled(*self._fit(prompt, responses, where), marks))
                continue
            rows = [self._fit(prompt, response, where) for response in responses]
            ranked = Ranked(rows[0][0], [completion for _, completion in rows], list(marks))
            examples += _labelled(ranked) if self.unpaired else [ranked]
        if not self.unpaired and any(isinstance(e, Labelled) for e in examples):
            raise DataError(
                f"The {split} preference data holds unpaired records ({{prompt, completion, label}}), which only an "
                "unpaired loss reads: set the data module's unpaired: true and the task's loss: kto, or give pairs."
            )
        if not self.unpaired:
            self._check_same_size(examples, split)
        return _Indexed(examples)

    def _fit(self, prompt: str, completion: str, where: str) -> tuple[list[int], list[int]]:
        prompt_ids, completion_ids = self.encode(prompt, completion)
        if len(prompt_ids) + len(completion_ids) > self.seq_len:
            raise DataError(
                f"{where}: the prompt and a completion come to {len(prompt_ids) + len(completion_ids)} tokens, more "
                f"than seq_len={self.seq_len}. Raise seq_len (up to the model's max_seq_len) or shorten the record."
            )
        return prompt_ids, completion_ids

    @staticmethod
    def _check_same_size(examples: list[Ranked], split: str) -> None:
        sizes = sorted({len(e.completions) for e in examples})
        if len(sizes) > 1:
            raise DataError(
                f"The {split} preference data ranks {' and '.join(map(str, sizes))} completions per prompt; a batch "
                "stacks the same number for every prompt. Give every record as many responses (a pair counts 2)."
            )

    def _collate(self) -> Any:
        return partial(collate_labelled if self.unpaired else collate_ranked, pad_id=self.tokenizer.pad_id)

    def _workers(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}


def encode_completion(
    tokenizer: Tokenizer, template: PromptTemplate | None, prompt: str, completion: str
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of ``completion`` as the assistant's reply to ``prompt``, rendered by ``template``
    (None: the prompt's tokens, then the completion's and ``eos``); shared with the reward-model judge."""
    if template is None:
        return tokenizer.encode(prompt), tokenizer.encode(completion) + [tokenizer.eos_id]
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    ids, trained = template.encode(tokenizer, messages)
    if True not in trained:
        return ids, []
    start, end = trained.index(True), len(trained) - trained[::-1].index(True)
    return ids[:start], ids[start:end]  # what the template renders after the reply's end of turn is dropped


def _labelled(ranked: Ranked) -> list[Labelled]:
    """A ranking as unpaired completions: the best ones desirable, the others not."""
    best = min(ranked.ranks)
    return [Labelled(ranked.prompt, c, r == best) for c, r in zip(ranked.completions, ranked.ranks)]


def collate_ranked(items: list[tuple[int, Ranked]], pad_id: int) -> dict[str, Tensor]:
    """Ranked examples -> rows (B * K, T) with their masks, ``ranks`` (B, K) and ``index`` (B,)."""
    indices, examples = _indexed(items)
    batch = pad_pairs([(e.prompt, c) for e in examples for c in e.completions], pad_id)
    batch["ranks"] = torch.tensor([e.ranks for e in examples], dtype=torch.long)
    batch["index"] = indices
    return batch


def collate_labelled(items: list[tuple[int, Labelled]], pad_id: int) -> dict[str, Tensor]:
    """Labelled completions -> rows (B, T), ``desirable`` (B,), ``index`` (B,) and the mismatched ``kl_*`` rows."""
    indices, examples = _indexed(items)
    batch = pad_pairs([(e.prompt, e.completion) for e in examples], pad_id)
    shifted = examples[1:] + examples[:1]
    mismatched = pad_pairs([(e.prompt, other.completion) for e, other in zip(examples, shifted)], pad_id)
    batch.update({f"kl_{key}": value for key, value in mismatched.items()})
    batch["desirable"] = torch.tensor([e.desirable for e in examples])
    batch["index"] = indices
    return batch


def _indexed(items: list) -> tuple[Tensor, list]:
    return torch.tensor([i for i, _ in items], dtype=torch.long), [e for _, e in items]


class _Indexed(list):
    """A list whose items are ``(index, item)``, so the collated batch knows which examples it holds."""

    def __getitem__(self, index):  # type: ignore[override]
        return index, super().__getitem__(index)
