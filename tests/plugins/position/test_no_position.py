import torch
from torch import nn

from lightningllm.mask import AttentionMask
from lightningllm_plugins.attention.multi_head import MultiHeadAttention
from lightningllm_plugins.position.no_position import NoPosition


def test_every_hook_is_a_no_op():
    position = NoPosition(dim=8, n_heads=2, head_dim=4, max_seq_len=4)
    x, q, k = torch.randn(2, 3, 8), torch.randn(2, 2, 3, 4), torch.randn(2, 1, 3, 4)
    positions = torch.arange(3)[None]
    assert torch.equal(position.embed(x, positions), x)
    rq, rk = position.rotate(q, k, positions)
    assert torch.equal(rq, q) and torch.equal(rk, k)
    assert position.bias(positions, positions) is None
    position.check_length(10**6)
    assert not list(position.parameters())


def test_attention_is_permutation_equivariant_without_causality():
    """No positional signal: permuting the tokens of a bidirectional layer permutes its outputs."""
    torch.manual_seed(0)
    position = NoPosition(dim=16, n_heads=2, head_dim=8, max_seq_len=8)
    attention = MultiHeadAttention(dim=16, n_heads=2)
    x = torch.randn(1, 6, 16)
    perm = torch.randperm(6)
    positions = torch.arange(6)[None]
    mask = AttentionMask(causal=False)
    out = attention(x, position=position, positions=positions, mask=mask)
    out_perm = attention(x[:, perm], position=position, positions=positions, mask=mask)
    torch.testing.assert_close(out_perm, out[:, perm])


def test_it_trains_running_count():
    """With only the causal mask, a layer learns the running fraction of token 0 (a NoPE-friendly task)."""
    torch.manual_seed(0)
    dim, T = 16, 8
    position = NoPosition(dim=dim, n_heads=2, head_dim=8, max_seq_len=T)
    embed, attention, head = nn.Embedding(2, dim), MultiHeadAttention(dim=dim, n_heads=2), nn.Linear(dim, 1)
    optimizer = torch.optim.Adam([*embed.parameters(), *attention.parameters(), *head.parameters()], lr=1e-2)
    positions = torch.arange(T)[None]
    losses = []
    for _ in range(40):
        x = torch.randint(2, (32, T))
        target = (x == 0).float().cumsum(1) / torch.arange(1, T + 1)
        h = attention(embed(x), position=position, positions=positions, mask=AttentionMask(causal=True))
        loss = nn.functional.mse_loss(head(h)[..., 0], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5
