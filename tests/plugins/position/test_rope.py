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


def llama3_reference(head_dim, base, factor, low_freq_factor, high_freq_factor, original_max_seq_len):
    """The Llama 3.1 frequency rule, one channel at a time in float64, from the formula in Meta's release."""
    out = []
    for i in range(head_dim // 2):
        freq = base ** (-2 * i / head_dim)
        wavelength = 2 * math.pi / freq
        if wavelength < original_max_seq_len / high_freq_factor:
            out.append(freq)  # high frequency: kept
        elif wavelength > original_max_seq_len / low_freq_factor:
            out.append(freq / factor)  # low frequency: interpolated like linear scaling
        else:
            s = (original_max_seq_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - s) * freq / factor + s * freq)
    return torch.tensor(out, dtype=torch.float64)


LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 64}


def test_llama3_frequencies_match_the_formula():
    head_dim, base = 32, 10000.0
    inv_freq = rope(head_dim, base=base, scaling="llama3", **LLAMA3).inv_freq()
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (head_dim // 2,)
    expected = llama3_reference(head_dim, base, **LLAMA3)
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)
    # the three regimes all occur at these settings, so the comparison covers each branch
    wavelengths = 2 * math.pi / expected
    assert (wavelengths < 64 / 4).any() and (wavelengths > 64).any()
    assert ((wavelengths >= 64 / 4) & (wavelengths <= 64)).any()


def test_llama3_keeps_high_and_divides_low_frequencies():
    head_dim, factor = 32, 8.0
    plain = rope(head_dim).inv_freq()
    scaled = rope(head_dim, scaling="llama3", **LLAMA3).inv_freq()
    wavelengths = 2 * math.pi / plain
    high, low = wavelengths < 64 / 4, wavelengths > 64
    assert high.sum() >= 2 and low.sum() >= 2
    torch.testing.assert_close(scaled[high], plain[high], rtol=0, atol=0)
    torch.testing.assert_close(scaled[low], plain[low] / factor)
    middle = ~high & ~low  # strictly between: slower than the original, faster than divided by factor
    assert middle.any()
    assert (scaled[middle] < plain[middle]).all() and (scaled[middle] > plain[middle] / factor).all()
    # a continuous rule: the ratio scaled / plain falls monotonically from 1 to 1 / factor with the wavelength
    ratio = scaled / plain
    assert (ratio[1:] <= ratio[:-1] + 1e-7).all()


def test_llama3_rotation_uses_the_rescaled_frequencies():
    head_dim = 16
    r = rope(head_dim, scaling="llama3", **LLAMA3)
    q = torch.randn(1, 2, 4, head_dim)
    positions = torch.tensor([[0, 7, 50, 300]])
    rq, _ = r.rotate(q, q, positions)
    theta = llama3_reference(head_dim, 10000.0, **LLAMA3)
    angles = positions[0].double()[:, None] * theta  # (T, hd/2)
    half = head_dim // 2
    a, b = q[..., :half].double(), q[..., half:].double()
    expected = torch.cat((a * angles.cos() - b * angles.sin(), a * angles.sin() + b * angles.cos()), dim=-1)
    torch.testing.assert_close(rq.double(), expected, atol=1e-5, rtol=1e-5)


def test_llama3_matches_transformers_when_installed():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=2, max_position_embeddings=256,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )  # fmt: skip
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    knobs = {**LLAMA3, "factor": 4.0}
    ours = rope(32, base=500.0, scaling="llama3", **knobs).inv_freq()
    assert attention_factor == 1.0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def yarn_reference(head_dim, base, factor, original_max_seq_len, beta_fast=32.0, beta_slow=1.0, truncate=True):
    """YaRN's frequencies (Peng et al., 2023, "NTK-by-parts" with a ramp), one channel at a time in float64.

    Channel d (of head_dim / 2) turns ``L / wavelength_d`` times over the original length; the channels
    turning beta_fast and beta_slow times bound a linear ramp from "keep" to "divide by factor".
    """

    def channel_turning(turns):  # solve L / (2 pi base^(2d / head_dim)) = turns for d
        return head_dim * math.log(original_max_seq_len / (2 * math.pi * turns)) / (2 * math.log(base))

    low, high = channel_turning(beta_fast), channel_turning(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    out = []
    for d in range(head_dim // 2):
        freq = base ** (-2 * d / head_dim)
        gamma = min(max((d - low) / (high - low), 0.0), 1.0)  # 0: extrapolate (keep), 1: interpolate
        out.append(gamma * freq / factor + (1 - gamma) * freq)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(
    "knobs",
    [
        {"factor": 4.0, "original_max_seq_len": 2048},
        {"factor": 16.0, "original_max_seq_len": 4096, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
    ],
    ids=["paper", "untruncated"],
)
def test_yarn_frequencies_match_the_formula(knobs):
    head_dim, base = 64, 10000.0
    r = rope(head_dim, base=base, scaling="yarn", **knobs)
    expected = yarn_reference(head_dim, base, **knobs)
    torch.testing.assert_close(r.inv_freq().double(), expected, rtol=1e-6, atol=0)
    plain = rope(head_dim, base=base).inv_freq().double()
    ratio = expected / plain  # 1 for the fast channels, 1 / factor for the slow ones, a ramp in between
    assert ratio[0] == pytest.approx(1.0) and ratio[-1] == pytest.approx(1 / knobs["factor"])
    assert ((ratio < 1 - 1e-6) & (ratio > 1 / knobs["factor"] + 1e-6)).any()


def test_yarn_scales_cos_and_sin_by_the_attention_factor():
    q = torch.randn(1, 2, 3, 16)
    positions = torch.tensor([[0, 9, 400]])
    default = rope(16, scaling="yarn", factor=8.0, original_max_seq_len=64)
    assert default.mscale == pytest.approx(0.1 * math.log(8.0) + 1)
    rq, _ = default.rotate(q, q, positions)
    theta = yarn_reference(16, 10000.0, 8.0, 64)
    angles = positions[0].double()[:, None] * theta
    a, b = q[..., :8].double(), q[..., 8:].double()
    expected = torch.cat((a * angles.cos() - b * angles.sin(), a * angles.sin() + b * angles.cos()), dim=-1)
    torch.testing.assert_close(rq.double(), expected * default.mscale, atol=1e-5, rtol=1e-5)
    explicit = rope(16, scaling="yarn", factor=8.0, original_max_seq_len=64, attention_factor=0.5)
    torch.testing.assert_close(explicit.rotate(q, q, positions)[0].double(), expected * 0.5, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "params",
    [
        {"factor": 4.0, "original_max_position_embeddings": 64},
        {"factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 8.0, "beta_slow": 2.0,
         "truncate": False, "attention_factor": 0.75},
    ],
    ids=["defaults", "knobs"],
)  # fmt: skip
def test_yarn_matches_transformers_when_installed(params):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=2, max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, **params},
    )  # fmt: skip
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config, torch.device("cpu"))
    knobs = {"original_max_seq_len" if k == "original_max_position_embeddings" else k: v for k, v in params.items()}
    ours = rope(32, base=500.0, scaling="yarn", **knobs)
    torch.testing.assert_close(ours.inv_freq(), theirs, rtol=0, atol=0)
    assert ours.mscale == attention_factor


@pytest.mark.parametrize(
    "knobs, head_dim, match",
    [
        ({}, 7, "head_dim=7"),
        ({"factor": 2.0}, 8, "no effect"),
        ({"scaling": "dynamic"}, 8, "'dynamic'"),
        ({"scaling": "ntk", "factor": 2.0}, 2, "head_dim > 2"),
        ({"base": -1.0}, 8, "base=-1.0"),
        (
            {"scaling": "linear", "factor": 2.0, "high_freq_factor": 8.0},
            8,
            "high_freq_factor=8.0 is used by scaling='llama3'",
        ),
        ({"original_max_seq_len": 4096}, 8, "original_max_seq_len=4096 is used by scaling='llama3' or 'yarn'"),
        ({"scaling": "llama3", "low_freq_factor": 4.0, "high_freq_factor": 4.0}, 8, "low_freq_factor=4.0"),
        ({"scaling": "llama3", "low_freq_factor": 0.0}, 8, "low_freq_factor=0.0"),
        ({"scaling": "llama3", "original_max_seq_len": 0}, 8, "original_max_seq_len=0"),
        ({"scaling": "llama3", "original_max_seq_len": 81.5}, 8, "original_max_seq_len=81.5"),
        ({"scaling": "llama3", "factor": 2.0, "beta_fast": 8.0}, 8, "beta_fast=8.0 is used by scaling='yarn'"),
        ({"scaling": "yarn", "beta_fast": 1.0, "beta_slow": 2.0}, 8, "beta_slow=2.0 and beta_fast=1.0"),
        ({"scaling": "yarn", "factor": 2.0, "attention_factor": 0.0}, 8, "attention_factor=0.0"),
    ],
)
def test_refuses_bad_configs(knobs, head_dim, match):
    with pytest.raises(ConfigError, match=match):
        rope(head_dim, **knobs)


def test_it_trains_previous_token_copy(train_previous_token_copy):
    """One RoPE attention layer learns to copy the previous token (needs relative position)."""
    losses = train_previous_token_copy(lambda: rope(8), vocab=12, T=12, steps=60)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


@pytest.mark.parametrize(
    "knobs",
    [
        {
            "scaling": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_seq_len": 8,
        },
        {"scaling": "yarn", "factor": 4.0, "original_max_seq_len": 64},
    ],
    ids=["llama3", "yarn"],
)
def test_it_trains_with_scaling(train_previous_token_copy, knobs):
    losses = train_previous_token_copy(lambda: rope(8, **knobs), vocab=12, T=12, steps=60)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_the_tables_of_one_positions_tensor_are_made_once_and_remade_when_it_changes():
    rope = RoPE(dim=32, n_heads=4, head_dim=8, max_seq_len=16)
    positions = torch.arange(5)[None]
    first = rope.cos_sin(positions)
    assert rope.cos_sin(positions) is first  # the next layer of the same forward
    positions += 3  # changed in place: new tables
    torch.testing.assert_close(
        rope.cos_sin(positions), RoPE(dim=32, n_heads=4, head_dim=8, max_seq_len=16).cos_sin(torch.arange(3, 8)[None])
    )
    with torch.inference_mode():
        inference = torch.arange(5)[None]
        assert rope.cos_sin(inference) is rope.cos_sin(inference)
