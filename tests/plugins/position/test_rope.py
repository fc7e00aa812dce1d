import math

import pytest
import torch

from lightningllm.errors import ConfigError
from lightningllm_plugins.position.rope import RoPE


def rope(head_dim=8, **knobs):
    return RoPE(dim=4 * head_dim, n_heads=4, head_dim=head_dim, max_seq_len=16, **knobs)


def complex_reference(x, positions, base=10000.0):
    """Meta's original Llama RoPE: channel pairs as complex numbers times e^{i pos theta}.

    x: (B, H, T, hd) in the rotate-half layout (channel i pairs with i + hd/2);
    positions: (T,) float.
    """
    hd = x.shape[-1]
    theta = torch.tensor([base ** (-2 * i / hd) for i in range(hd // 2)], dtype=torch.float64)
    angles = positions.double()[:, None] * theta[None]  # (T, hd/2)
    rotation = torch.polar(torch.ones_like(angles), angles)
    half = hd // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())  # rotate-half -> complex pairs
    out = z * rotation
    return torch.cat((out.real, out.imag), dim=-1)


def loop_reference(x, positions, base=10000.0):
    """An explicit 2x2 rotation per position and channel pair."""
    out = x.clone().double()
    hd = x.shape[-1]
    half = hd // 2
    for t, pos in enumerate(positions.tolist()):
        for i in range(half):
            angle = pos * base ** (-2 * i / hd)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[..., t, i].double(), x[..., t, i + half].double()
            out[..., t, i] = c * a - s * b
            out[..., t, i + half] = s * a + c * b
    return out


def test_matches_complex_and_loop_references():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    positions = torch.tensor([[3, 4, 5, 6, 7, 40]])
    rq, rk = rope().rotate(q, k, positions)
    assert rq.shape == q.shape and rk.shape == k.shape
    torch.testing.assert_close(rq.double(), complex_reference(q, positions[0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rk.double(), complex_reference(k, positions[0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rq.double(), loop_reference(q, positions[0]), atol=1e-5, rtol=1e-5)


def test_rotation_preserves_norm_and_position_zero_is_identity():
    q = torch.randn(1, 2, 3, 16)
    rq, _ = rope(16).rotate(q, q[:, :1], torch.tensor([[0, 1, 2]]))
    torch.testing.assert_close(rq[:, :, 0], q[:, :, 0])
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))


def test_scores_depend_only_on_relative_position():
    torch.manual_seed(1)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    r = rope(16)

    def score(m, n):
        rq, _ = r.rotate(q, k, torch.tensor([[m]]))
        _, rk = r.rotate(q, k, torch.tensor([[n]]))
        return (rq * rk).sum().item()

    for m, n in [(5, 2), (9, 4), (0, 7)]:
        for shift in (1, 13, 250):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)  # and it does depend on the offset


def test_per_row_positions():
    q, k = torch.randn(2, 2, 3, 8), torch.randn(2, 1, 3, 8)
    positions = torch.tensor([[0, 1, 2], [7, 8, 9]])
    rq, rk = rope().rotate(q, k, positions)
    for b in range(2):
        torch.testing.assert_close(
            rq[b].double(), complex_reference(q[b : b + 1], positions[b])[0], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            rk[b].double(), complex_reference(k[b : b + 1], positions[b])[0], atol=1e-5, rtol=1e-5
        )


def test_positions_beyond_max_seq_len():
    q = torch.randn(1, 1, 2, 8)
    positions = torch.tensor([[1000, 5000]])
    rq, _ = rope().rotate(q, q, positions)  # max_seq_len is 16
    torch.testing.assert_close(rq.double(), complex_reference(q, positions[0]), atol=1e-4, rtol=1e-4)


def test_linear_scaling_is_position_interpolation():
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    positions = torch.tensor([[0, 3, 8, 11, 30]])
    scaled = rope(scaling="linear", factor=4.0).rotate(q, k, positions)
    plain = rope().rotate(q, k, positions / 4.0)
    torch.testing.assert_close(scaled, plain)
    torch.testing.assert_close(scaled[0].double(), complex_reference(q, positions[0] / 4.0), atol=1e-5, rtol=1e-5)


def test_ntk_scaling_base_formula():
    head_dim, base, factor = 16, 10000.0, 8.0
    r = rope(head_dim, base=base, scaling="ntk", factor=factor)
    expected_base = base * factor ** (head_dim / (head_dim - 2))
    assert r.base == pytest.approx(expected_base)
    q = torch.randn(1, 1, 4, head_dim)
    positions = torch.tensor([[0, 5, 100, 2000]])
    rq, _ = r.rotate(q, q, positions)
    torch.testing.assert_close(rq.double(), complex_reference(q, positions[0], expected_base), atol=1e-4, rtol=1e-4)
    # NTK keeps the highest frequency and divides the lowest one by the factor
    plain = rope(head_dim, base=base).inv_freq()
    ntk = r.inv_freq()
    assert ntk[0].item() == pytest.approx(plain[0].item())
    assert ntk[-1].item() == pytest.approx(plain[-1].item() / factor, rel=1e-5)


def test_low_precision_is_rotated_in_float32():
    q = torch.randn(1, 2, 4, 8)
    positions = torch.tensor([[0, 1, 900, 901]])
    full, _ = rope().rotate(q, q, positions)
    half, _ = rope().rotate(q.bfloat16(), q.bfloat16(), positions)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize(
    "knobs, head_dim, match",
    [
        ({}, 7, "head_dim=7"),
        ({"factor": 2.0}, 8, "no effect"),
        ({"scaling": "yarn"}, 8, "'yarn'"),
        ({"scaling": "ntk", "factor": 2.0}, 2, "head_dim > 2"),
        ({"base": -1.0}, 8, "base=-1.0"),
    ],
)
def test_refuses_bad_configs(knobs, head_dim, match):
    with pytest.raises(ConfigError, match=match):
        rope(head_dim, **knobs)


def test_it_trains_previous_token_copy(train_previous_token_copy):
    """One RoPE attention layer learns to copy the previous token (needs relative position)."""
    losses = train_previous_token_copy(lambda: rope(8), vocab=12, T=12, steps=60)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
