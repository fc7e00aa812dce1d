import math

import pytest
import torch
from torch import nn

from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask
from lightningllm_plugins.attention.multi_head import MultiHeadAttention
from lightningllm_plugins.position.relative_bias import RelativePositionBias, relative_position_bucket


def paper_bucket(relative_position: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """T5's bucketing for one ``key - query`` offset, written from the Mesh TensorFlow formula in plain Python.

    Per direction n buckets: distances below n/2 get one bucket each; the rest
    ``n/2 + floor(log(d / (n/2)) / log(max_distance / (n/2)) * (n - n/2))``, capped at n - 1.
    """
    bucket, n = 0, num_buckets
    if bidirectional:
        n //= 2
        if relative_position > 0:
            bucket += n
        distance = abs(relative_position)
    else:
        distance = max(-relative_position, 0)
    exact = n // 2
    if distance < exact:
        return bucket + distance
    large = exact + int(math.log(distance / exact) / math.log(max_distance / exact) * (n - exact))
    return bucket + min(large, n - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20), (10, 7)])
def test_buckets_follow_the_formula(bidirectional, num_buckets, max_distance):
    offsets = torch.arange(-300, 301)
    got = relative_position_bucket(offsets, bidirectional=bidirectional, num_buckets=num_buckets,
                                   max_distance=max_distance)  # fmt: skip
    expected = [paper_bucket(o, bidirectional, num_buckets, max_distance) for o in offsets.tolist()]
    assert got.tolist() == expected
    assert got.min() >= 0 and got.max() < num_buckets


def test_t5_bucket_landmarks():
    """Hand-derived values for T5's 32 buckets / 128: exact below 8 (bidirectional) and 16 (causal), log after."""
    bucket = lambda o, b: relative_position_bucket(torch.tensor(o), bidirectional=b, num_buckets=32, max_distance=128)  # noqa: E731
    assert [bucket(o, True).item() for o in (0, -1, -7, 1, 7)] == [0, 1, 7, 17, 23]
    assert bucket(-8, True).item() == 8 and bucket(-127, True).item() == 15 and bucket(-(10**6), True).item() == 15
    assert bucket(10**6, True).item() == 31
    assert [bucket(o, False).item() for o in (0, -1, -15, 5)] == [0, 1, 15, 0]  # keys after the query: bucket 0
    assert bucket(-16, False).item() == 16 and bucket(-(10**6), False).item() == 31


def test_matches_transformers_bucket_function():
    transformers = pytest.importorskip("transformers")
    hf = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    offsets = torch.arange(-200, 201)[None]
    for bidirectional in (True, False):
        ours = relative_position_bucket(offsets, bidirectional=bidirectional, num_buckets=32, max_distance=128)
        assert torch.equal(ours, hf(offsets, bidirectional=bidirectional, num_buckets=32, max_distance=128))


def test_bias_looks_up_the_table_per_head():
    torch.manual_seed(0)
    position = RelativePositionBias(dim=16, n_heads=2, head_dim=8, max_seq_len=8, num_buckets=8, max_distance=20,
                                    bidirectional=False)  # fmt: skip
    q_positions, k_positions = torch.tensor([[5, 6], [0, 1]]), torch.arange(7)[None].expand(2, -1)
    bias = position.bias(q_positions, k_positions)
    assert bias.shape == (2, 2, 2, 7)
    for b in range(2):
        for h in range(2):
            for t in range(2):
                for j in range(7):
                    bucket = paper_bucket(j - q_positions[b, t].item(), False, 8, 20)
                    assert bias[b, h, t, j] == position.table.weight[bucket, h]
    x = torch.randn(1, 3, 16)
    assert position.embed(x, q_positions[:1]) is x
    position.check_length(10**6)  # distances past max_distance share a bucket: any length


def test_attention_adds_the_bias_before_the_softmax():
    torch.manual_seed(0)
    attention = MultiHeadAttention(dim=16, n_heads=2, softmax_scale=1.0).double()
    position = RelativePositionBias(dim=16, n_heads=2, head_dim=8, max_seq_len=8).double()
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    positions = torch.arange(5)[None]
    out = attention(x, position=position, positions=positions, mask=AttentionMask(causal=False))
    q = attention.q_proj(x).view(1, 5, 2, 8).transpose(1, 2)
    k = attention.k_proj(x).view(1, 5, 2, 8).transpose(1, 2)
    v = attention.v_proj(x).view(1, 5, 2, 8).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) + position.bias(positions, positions), dim=-1)
    expected = attention.o_proj((probs @ v).transpose(1, 2).reshape(1, 5, 16))
    torch.testing.assert_close(out, expected)


def test_refuses_too_few_buckets_and_survives_meta_init():
    with pytest.raises(ConfigError, match="num_buckets=2"):
        RelativePositionBias(dim=8, n_heads=2, head_dim=4, max_seq_len=8, num_buckets=2)
    with pytest.raises(ConfigError, match="max_distance=4"):
        RelativePositionBias(dim=8, n_heads=2, head_dim=4, max_seq_len=8, num_buckets=32, max_distance=4)
    with torch.device("meta"):
        position = RelativePositionBias(dim=8, n_heads=2, head_dim=4, max_seq_len=8, init_std=0.5)
    position.to_empty(device="cpu")
    position.reset_parameters()
    assert torch.isfinite(position.table.weight).all() and 0.2 < position.table.weight.std() < 1.0


def test_it_trains_previous_token_copy():
    """Copying the previous token needs to know where it is: only the learned bias can tell the layer."""
    torch.manual_seed(0)
    vocab, T, dim = 10, 10, 32
    embed, head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)
    attention = MultiHeadAttention(dim=dim, n_heads=4, softmax_scale=1.0)
    position = RelativePositionBias(dim=dim, n_heads=4, head_dim=8, max_seq_len=T, num_buckets=8,
                                    max_distance=16, bidirectional=False)  # fmt: skip
    modules = (embed, head, attention, position)
    optimizer = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=3e-2)
    positions = torch.arange(T)[None]
    losses = []
    for _ in range(60):
        x = torch.randint(vocab, (16, T))
        h = attention(embed(x), position=position, positions=positions, mask=AttentionMask(causal=True))
        loss = nn.functional.cross_entropy(head(h)[:, 1:].reshape(-1, vocab), x[:, :-1].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
