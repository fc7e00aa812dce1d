"""AttentionMask.allowed against its definition written out per (row, query, key), with and without a cache offset."""

import itertools

import pytest
import torch

from lightningllm.mask import AttentionMask


def allowed_by_hand(B, T, S, *, causal, padding, prefix_lengths, window, document_ids):
    """Queries at positions S - T .. S - 1 (the last T of S keys, as when decoding with a cache)."""
    out = torch.zeros(B, 1, T, S, dtype=torch.bool)
    for b, i, k in itertools.product(range(B), range(T), range(S)):
        q = S - T + i
        ok = True
        if causal:
            in_prefix = prefix_lengths is not None and q < prefix_lengths[b] and k < prefix_lengths[b]
            ok = ok and (k <= q or in_prefix)
        if window is not None:
            ok = ok and q - k < window
        if document_ids is not None:
            ok = ok and document_ids[b, q] == document_ids[b, k]
        if padding is not None:
            ok = ok and bool(padding[b, k])
        out[b, 0, i, k] = ok
    return out


@pytest.mark.parametrize("T", [6, 2, 1], ids=["full", "two-new", "one-new"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("knobs", ["padding", "prefix", "window", "documents", "all"])
def test_allowed_matches_the_definition_for_every_combination_and_cache_offset(T, causal, knobs):
    B, S = 2, 6
    padding = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    prefix = torch.tensor([3, 1])
    documents = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 2, 2, 2]])
    chosen = {
        "padding": padding if knobs in ("padding", "all") else None,
        "prefix_lengths": prefix if knobs in ("prefix", "all") and causal else None,
        "window": 2 if knobs in ("window", "all") else None,
        "document_ids": documents if knobs in ("documents", "all") else None,
    }
    mask = AttentionMask(causal=causal, **chosen)
    q_positions = torch.arange(S - T, S)[None]
    allowed = mask.allowed(q_positions, torch.arange(S)[None])
    expected = allowed_by_hand(B, T, S, causal=causal, **chosen)
    if allowed is None:  # nothing restricts attention
        assert expected.all() and mask.is_empty()
        return
    assert torch.equal(allowed.expand(B, 1, T, S), expected)
