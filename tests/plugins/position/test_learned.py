import pytest
import torch
from torch import nn

from lightningllm.errors import ConfigError
from lightningllm_plugins.position.learned import LearnedPosition


def learned(dim=8, max_seq_len=16):
    return LearnedPosition(dim=dim, n_heads=2, head_dim=dim // 2, max_seq_len=max_seq_len)


def test_embed_adds_table_rows():
    position = learned()
    x = torch.randn(2, 3, 8)
    positions = torch.tensor([[0, 1, 2], [5, 9, 15]])
    out = position.embed(x, positions)
    for b in range(2):
        for t in range(3):
            torch.testing.assert_close(out[b, t], x[b, t] + position.table.weight[positions[b, t]])
    shared = position.embed(x, positions[:1])  # (1, T) positions broadcast over the batch
    torch.testing.assert_close(shared[1], x[1] + position.table.weight[:3])


def test_check_length_explains_the_limit():
    position = learned(max_seq_len=16)
    position.check_length(16)
    with pytest.raises(ConfigError) as err:
        position.check_length(17)
    message = str(err.value)
    assert "17" in message and "max_seq_len=16" in message and "\n" not in message


def test_reset_parameters_is_normal_002():
    torch.manual_seed(0)
    position = learned(dim=64, max_seq_len=512)
    nn.init.zeros_(position.table.weight)
    position.reset_parameters()
    std = position.table.weight.std().item()
    assert 0.018 < std < 0.022
    assert abs(position.table.weight.mean().item()) < 0.002


def test_it_trains_position_readout():
    """The table learns codes that a linear probe can tell apart."""
    torch.manual_seed(0)
    T, dim = 16, 16
    position, probe = learned(dim, T), nn.Linear(dim, T)
    optimizer = torch.optim.Adam([*position.parameters(), *probe.parameters()], lr=5e-2)
    positions = torch.arange(T)[None]
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(probe(position.embed(torch.zeros(1, T, dim), positions))[0], positions[0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
