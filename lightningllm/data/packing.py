"""Batches of tokenised examples: padded one per row, or packed several per row.

An example is ``(ids, trained)``: its token ids and, per token, whether the loss trains on it. Its
training pair is ``input_ids = ids[:-1]`` and ``labels = ids[1:]`` with untrained targets set to
``IGNORE_INDEX``: the loss covers exactly the tokens the template marks (the end-of-turn token included).

Packing (as in T5, and Krell et al., 2021, "Efficient Sequence Packing without Cross-contamination")
puts several examples in one row. The batch then carries ``document_ids`` (which example each token
belongs to; -1 for padding) and ``positions`` that restart at 0 for each example; the task turns them
into :class:`~lightningllm.mask.AttentionMask` ``document_ids`` so attention never crosses an example's
boundary, and each example is computed exactly as it would be alone in its row.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch
from torch import Tensor

from lightningllm.contracts import IGNORE_INDEX

Example = tuple[list[int], list[bool]]
PAD_DOCUMENT = -1


def training_pair(example: Example) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example, both ``len(ids) - 1`` long."""
    ids, trained = example
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], trained[1:])]
    return ids[:-1], labels


def pack(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Group example indices into rows of at most ``seq_len`` tokens, best-fit decreasing.

    The longest example goes first, each into the open row it fills most tightly (the earliest such row), or
    a new row. Deterministic; O(n * seq_len). Each ``lengths[i] <= seq_len``.

    Returns:
        One list of example indices per row, each row's indices in ascending order.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    by_space: list[list[int]] = [[] for _ in range(seq_len + 1)]  # heaps of row numbers by their free tokens
    for i in order:
        space = next((s for s in range(lengths[i], seq_len + 1) if by_space[s]), None)
        if space is None:
            rows.append([])
            row, space = len(rows) - 1, seq_len
        else:
            row = heapq.heappop(by_space[space])
        rows[row].append(i)
        heapq.heappush(by_space[space - lengths[i]], row)
    return [sorted(row) for row in rows]


def collate_padded(examples: Sequence[Example], pad_id: int) -> dict[str, Tensor]:
    """One example per row, right-padded to the longest: ``input_ids`` and ``labels`` (B, T).

    Right padding needs no mask under causal attention: real tokens never see the padding after them.
    """
    pairs = [training_pair(e) for e in examples]
    T = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, lab) in enumerate(pairs):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "labels": labels}


def collate_packed(rows: Sequence[Sequence[Example]], pad_id: int) -> dict[str, Tensor]:
    """Several examples per row: ``input_ids``, ``labels``, ``positions`` and ``document_ids``, all (B, T).

    ``T`` is the longest row; ``positions`` count from 0 in each example; ``document_ids`` number the
    examples of a row from 0, with padding at -1.
    """
    packed = [_pack_row(row) for row in rows]
    T = max(len(ids) for ids, _, _, _ in packed)
    batch = {
        "input_ids": torch.full((len(rows), T), pad_id, dtype=torch.long),
        "labels": torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long),
        "positions": torch.zeros(len(rows), T, dtype=torch.long),
        "document_ids": torch.full((len(rows), T), PAD_DOCUMENT, dtype=torch.long),
    }
    for r, columns in enumerate(packed):
        for key, values in zip(("input_ids", "labels", "positions", "document_ids"), columns):
            batch[key][r, : len(values)] = torch.tensor(values)
    return batch


def _pack_row(row: Sequence[Example]) -> tuple[list[int], list[int], list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    documents: list[int] = []
    for doc, example in enumerate(row):
        x, y = training_pair(example)
        ids += x
        labels += y
        positions += range(len(x))
        documents += [doc] * len(x)
    return ids, labels, positions, documents
