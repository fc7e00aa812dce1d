import math

import pytest
import torch
from torch import nn

from lightningllm_plugins.position.sinusoidal import Sinusoidal


def sinusoidal(dim, **knobs):
    return Sinusoidal(dim=dim, n_heads=2, head_dim=dim // 2, max_seq_len=8, **knobs)


def paper(pos, index, dim, base=10000.0):
    i = index // 2
    angle = pos / base ** (2 * i / dim)
    return math.sin(angle) if index % 2 == 0 else math.cos(angle)


@pytest.mark.parametrize("dim", [16, 7])
def test_matches_paper_formula(dim):
    positions = torch.tensor([[0, 1, 5, 37, 1000]])  # 1000 is beyond max_seq_len: still encoded
    pe = sinusoidal(dim).encoding(positions)
    assert pe.shape == (1, 5, dim)
    for t, pos in enumerate(positions[0].tolist()):
        for index in range(dim):
            assert pe[0, t, index].item() == pytest.approx(paper(pos, index, dim), abs=2e-4)


def test_base_knob():
    pe = sinusoidal(8, base=100.0).encoding(torch.tensor([[3]]))
    assert pe[0, 0, 2].item() == pytest.approx(paper(3, 2, 8, base=100.0), abs=1e-5)


def test_embed_adds_encoding_per_row():
    position = sinusoidal(8)
    x = torch.randn(2, 3, 8)
    positions = torch.tensor([[0, 1, 2], [4, 5, 6]])
    out = position.embed(x, positions)
    for b in range(2):
        for t in range(3):
            expected = [paper(positions[b, t].item(), i, 8) for i in range(8)]
            torch.testing.assert_close(out[b, t] - x[b, t], torch.tensor(expected), atol=1e-5, rtol=0)
    assert position.embed(x.bfloat16(), positions).dtype == torch.bfloat16
    assert not list(position.parameters()) and not position.state_dict()


def test_it_trains_position_readout():
    """A linear probe on the encodings learns to tell positions apart."""
    torch.manual_seed(0)
    T, dim = 16, 32
    position, probe = sinusoidal(dim), nn.Linear(dim, T)
    optimizer = torch.optim.Adam(probe.parameters(), lr=5e-2)
    positions = torch.arange(T)[None]
    losses = []
    for _ in range(40):
        h = position.embed(torch.zeros(1, T, dim), positions)
        loss = nn.functional.cross_entropy(probe(h)[0], positions[0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
