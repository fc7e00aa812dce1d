"""Shared pieces of the position plugin tests."""

from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightningllm.contracts import Position
from lightningllm.mask import AttentionMask
from lightningllm_plugins.attention.multi_head import MultiHeadAttention

DIM, N_HEADS = 32, 4  # head_dim 8


def fit_previous_token_copy(make_position: Callable[[], Position], vocab: int, T: int, steps: int) -> list[float]:
    """Adam steps on one causal attention layer (dim 32, 4 heads) that must output the previous token.

    Copying the previous token needs relative position, so the loss falls only if ``make_position()``
    (built after seeding, for heads of size 8) tells the layer where each key is. Returns the losses.
    """
    torch.manual_seed(0)
    embed, head = nn.Embedding(vocab, DIM), nn.Linear(DIM, vocab)
    attention = MultiHeadAttention(dim=DIM, n_heads=N_HEADS, n_kv_heads=N_HEADS)
    position = make_position()
    params = [*embed.parameters(), *head.parameters(), *attention.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    positions = torch.arange(T)[None]
    losses = []
    for _ in range(steps):
        x = torch.randint(vocab, (16, T))
        h = attention(embed(x), position=position, positions=positions, mask=AttentionMask(causal=True))
        loss = nn.functional.cross_entropy(head(h)[:, 1:].reshape(-1, vocab), x[:, :-1].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def train_previous_token_copy():
    return fit_previous_token_copy
