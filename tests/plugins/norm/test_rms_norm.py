import pytest
import torch
import torch.nn.functional as F

from lightningllm_plugins.norm.rms_norm import RMSNorm


def by_hand(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * w (Zhang & Sennrich 2019, eq. 4), in float64."""
    x = x.double()
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps) * weight.double()


@pytest.mark.parametrize("eps", [1e-5, 1e-6, 0.5])
def test_matches_formula(eps):
    torch.manual_seed(0)
    norm = RMSNorm(dim=16, eps=eps)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
    x = torch.randn(3, 5, 16) * 3 + 1
    torch.testing.assert_close(norm(x).double(), by_hand(x, norm.weight, eps), atol=1e-5, rtol=1e-5)


def test_does_not_centre():
    # A constant input: LayerNorm would give zeros; RMSNorm keeps the sign and gives ~1.
    norm = RMSNorm(dim=8, eps=1e-8)
    torch.testing.assert_close(norm(torch.full((2, 8), -3.0)), torch.full((2, 8), -1.0))


def test_weight_starts_at_ones_and_no_bias():
    norm = RMSNorm(dim=8)
    assert torch.equal(norm.weight, torch.ones(8))
    assert [name for name, _ in norm.named_parameters()] == ["weight"]


def test_low_precision_input_keeps_dtype():
    torch.manual_seed(0)
    norm = RMSNorm(dim=64)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
    x = (torch.randn(2, 7, 64) * 40).bfloat16()  # a large scale: squares overflow nothing in float32
    expected = by_hand(x.float(), norm.weight, norm.eps)
    for params_dtype in (torch.float32, torch.bfloat16):
        out = norm.to(params_dtype)(x)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), expected, atol=4e-2, rtol=2e-2)
    fp16 = torch.full((1, 64), 300.0, dtype=torch.float16)  # 300**2 overflows float16
    assert torch.isfinite(RMSNorm(dim=64)(fp16)).all()


def test_reset_parameters_after_meta_init():
    with torch.device("meta"):
        norm = RMSNorm(dim=8)
    norm = norm.to_empty(device="cpu")
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.ones(8))


def test_it_trains():
    torch.manual_seed(0)
    x = torch.randn(64, 16) * 2
    y = by_hand(x, torch.linspace(0.5, 2.0, 16), 1e-5).float()
    norm = RMSNorm(dim=16)
    opt = torch.optim.Adam(norm.parameters(), lr=5e-2)
    losses = []
    for _ in range(40):
        loss = F.mse_loss(norm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
