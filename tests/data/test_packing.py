"""Packing: rows, restarting positions, document ids, and packed training equal to unpacked training."""

from __future__ import annotations

import random

import pytest
import torch

from lightningllm.contracts import IGNORE_INDEX
from lightningllm.data.packing import collate_packed, collate_padded, pack, training_pair
from lightningllm.tasks.instruction import packed_inputs, real_tokens, response_loss


def random_examples(n: int, vocab: int = 40, seed: int = 0, max_len: int = 20) -> list:
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        length = rng.randint(3, max_len)
        prompt = rng.randint(1, length - 2)
        ids = [rng.randrange(5, vocab) for _ in range(length)]
        examples.append((ids, [False] * prompt + [True] * (length - prompt)))
    return examples


def naive_best_fit(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing written as a scan over every open row (the reference)."""
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [(seq_len - sum(lengths[j] for j in row), r) for r, row in enumerate(rows)]
        fits = [(space, r) for space, r in fits if space >= lengths[i]]
        if fits:
            rows[min(fits)[1]].append(i)
        else:
            rows.append([i])
    return [sorted(row) for row in rows]


@pytest.mark.parametrize("seed", range(5))
def test_pack_matches_a_naive_best_fit_decreasing(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 32) for _ in range(200)]
    rows = pack(lengths, 32)
    assert rows == naive_best_fit(lengths, 32)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 32 for row in rows)


def test_packed_batch_restarts_positions_and_numbers_documents():
    a = ([1, 2, 3, 4], [False, False, True, True])
    b = ([5, 6, 7], [False, True, True])
    batch = collate_packed([[a, b]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 5, 6]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 3, 4, 6, 7]]
    assert batch["positions"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1]]
    padded = collate_packed([[a], [b]], pad_id=0)
    assert padded["document_ids"].tolist() == [[0, 0, 0], [0, 0, -1]]
    assert padded["labels"][1].tolist() == [6, 7, IGNORE_INDEX]


def test_training_pair_shifts_and_masks_the_prompt():
    assert training_pair(([1, 2, 3, 4], [False, False, True, True])) == ([1, 2, 3], [IGNORE_INDEX, 3, 4])


@pytest.mark.parametrize("normalise", ["token", "sequence"])
@pytest.mark.parametrize("position", ["LearnedPosition", "RoPE"])
def test_packed_and_unpacked_training_give_the_same_loss_and_gradients(decoder_factory, normalise, position):
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=40, max_seq_len=64, position=position)
    examples = random_examples(12)
    padded = collate_padded(examples, pad_id=0)
    rows = pack([len(ids) - 1 for ids, _ in examples], 48)
    assert len(rows) < len(examples)  # several examples share a row
    packed = collate_packed([[examples[i] for i in row] for row in rows], pad_id=0)

    losses, grads = [], []
    for batch in (padded, packed):
        model.zero_grad()
        logits = model(batch["input_ids"], **packed_inputs(batch))
        loss = response_loss(logits, batch["labels"], batch.get("document_ids"), normalise)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_response_loss_per_sequence_is_the_mean_of_each_response_mean():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 7)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, IGNORE_INDEX, 3, IGNORE_INDEX], [4, IGNORE_INDEX, 5, 6, 0, 1]])
    documents = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    nll = -logits.log_softmax(-1)
    means = []
    for row, spans in ((0, [(0, 3), (3, 5)]), (1, [(0, 6)])):
        for start, end in spans:
            values = [nll[row, t, labels[row, t]] for t in range(start, end) if labels[row, t] != IGNORE_INDEX]
            means.append(sum(values) / len(values))
    expected = sum(means) / len(means)
    assert response_loss(logits, labels, documents, "sequence").item() == pytest.approx(expected.item(), rel=1e-6)
    every = [nll[r, t, labels[r, t]] for r in range(2) for t in range(6) if labels[r, t] != IGNORE_INDEX]
    assert response_loss(logits, labels, documents, "token").item() == pytest.approx(
        (sum(every) / len(every)).item(), rel=1e-6
    )


def test_real_tokens_leave_out_padding():
    examples = random_examples(3)
    padded, packed = collate_padded(examples, pad_id=0), collate_packed([examples], pad_id=0)
    total = sum(len(ids) - 1 for ids, _ in examples)
    assert int(real_tokens(padded).sum()) == total == int(real_tokens(packed).sum())
