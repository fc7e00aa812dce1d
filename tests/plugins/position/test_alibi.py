import math

import pytest
import torch

from lightningllm_plugins.position.alibi import ALiBi


def alibi(n_heads):
    return ALiBi(dim=8 * n_heads, n_heads=n_heads, head_dim=8, max_seq_len=16)


def paper_slopes(n):
    """Press et al. (2022): 2^(-8k/n) for k = 1..n when n is a power of two; otherwise the
    slopes of the largest power of two below n, then the odd-numbered ones of twice that."""
    if n & (n - 1) == 0:
        return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]
    p = 1 << (n.bit_length() - 1)
    extra = [2.0 ** (-8.0 * k / (2 * p)) for k in range(1, 2 * p + 1, 2)]
    return paper_slopes(p) + extra[: n - p]


def test_slopes_for_eight_heads():
    assert alibi(8).slopes.tolist() == pytest.approx([1 / 2**k for k in range(1, 9)])


@pytest.mark.parametrize("n_heads", [1, 2, 3, 5, 6, 12, 16, 20])
def test_slopes_follow_paper_rule(n_heads):
    assert alibi(n_heads).slopes.tolist() == pytest.approx(paper_slopes(n_heads))


def test_twelve_heads_explicitly():
    expected = [2.0**-k for k in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    assert alibi(12).slopes.tolist() == pytest.approx(expected)


def test_bias_matrix():
    position = alibi(4)
    q_positions = torch.tensor([[3, 4, 5]])
    k_positions = torch.arange(6)[None]
    bias = position.bias(q_positions, k_positions)
    assert bias.shape == (1, 4, 3, 6)
    slopes = paper_slopes(4)
    for h in range(4):
        for t, i in enumerate(q_positions[0].tolist()):
            for j in range(6):
                assert bias[0, h, t, j].item() == pytest.approx(-slopes[h] * abs(i - j))


def test_bias_per_row_positions_and_no_other_hooks():
    position = alibi(2)
    q_positions, k_positions = torch.tensor([[0, 1], [10, 11]]), torch.tensor([[0, 1], [10, 11]])
    bias = position.bias(q_positions, k_positions)
    assert bias.shape == (2, 2, 2, 2)
    torch.testing.assert_close(bias[0], bias[1])  # only distances matter
    x = torch.randn(1, 2, 16)
    assert position.embed(x, q_positions[:1]) is x
    position.check_length(10**6)  # extrapolates: any length is fine


def test_slopes_survive_meta_init():
    with torch.device("meta"):
        position = alibi(6)
    position.to_empty(device="cpu")
    position.reset_parameters()
    assert position.slopes.tolist() == pytest.approx(paper_slopes(6))
    assert "slopes" not in position.state_dict()


def test_it_trains(train_previous_token_copy):
    losses = train_previous_token_copy(lambda: alibi(4), vocab=10, T=10, steps=40)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert math.isfinite(losses[-1])
