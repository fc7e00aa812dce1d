"""Tiny stand-ins for the children a block wires: linear attention/ffn, randomised LayerNorms."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightningllm.contracts import Attention, FeedForward, Position
from lightningllm.mask import AttentionMask

DIM = 8


class FakeAttention(Attention):
    """A linear map that records the keywords it was given."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.o_proj = nn.Linear(dim, dim)
        self.seen: dict = {}

    def forward(self, x, *, position, positions, mask, cache=None, context=None):
        self.seen = {"position": position, "positions": positions, "mask": mask, "cache": cache}
        return self.o_proj(x)


class FakeFFN(FeedForward):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.down_proj = nn.Linear(dim, dim)

    def forward(self, x):
        return torch.tanh(self.down_proj(x))


def random_layer_norm(dim: int) -> nn.LayerNorm:
    norm = nn.LayerNorm(dim)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
        norm.bias.normal_(0.0, 0.5)
    return norm


@pytest.fixture
def parts():
    """Fresh children: attention, ffn, norm_1, norm_2 (the two norms differ)."""
    torch.manual_seed(0)
    return SimpleNamespace(
        attention=FakeAttention(DIM), ffn=FakeFFN(DIM), norm_1=random_layer_norm(DIM), norm_2=random_layer_norm(DIM)
    )


@pytest.fixture
def attention_kwargs():
    """The keywords a model passes to a block; the cache is a sentinel the block must hand on untouched."""
    return {
        "position": Position(),
        "positions": torch.arange(5)[None],
        "mask": AttentionMask(causal=True),
        "cache": object(),
    }


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(2, 5, DIM)


def fit(block: nn.Module, attention_kwargs: dict, steps: int = 60) -> list[float]:
    """A few Adam steps regressing the block onto a fixed nonlinear target; returns the losses."""
    torch.manual_seed(2)
    x = torch.randn(16, 5, DIM)
    y = torch.sin(x @ torch.randn(DIM, DIM))
    kwargs = {**attention_kwargs, "cache": None}
    opt = torch.optim.Adam(block.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(block(x, **kwargs), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def train():
    return fit
