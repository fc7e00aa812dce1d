import pytest
import torch
import torch.nn.functional as F

from lightningllm_plugins.norm.layer_norm import LayerNorm


def randomised(norm: LayerNorm) -> LayerNorm:
    """Move the affine parameters away from the identity so the tests see them."""
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
        if norm.bias is not None:
            norm.bias.normal_(0.0, 0.5)
    return norm


def by_hand(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(biased var + eps) * weight + bias, in float64."""
    x = x.double()
    mean = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    out = (x - mean) / torch.sqrt(var + eps) * weight.double()
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_matches_torch_and_formula(bias, eps):
    torch.manual_seed(0)
    norm = randomised(LayerNorm(dim=16, eps=eps, bias=bias))
    x = torch.randn(3, 5, 16) * 3 + 1
    out = norm(x)
    torch.testing.assert_close(out, F.layer_norm(x, (16,), norm.weight, norm.bias, eps))
    torch.testing.assert_close(out.double(), by_hand(x, norm.weight, norm.bias, eps), atol=1e-5, rtol=1e-5)
    assert (norm.bias is not None) is bias


def test_low_precision_input_keeps_dtype():
    torch.manual_seed(0)
    norm = randomised(LayerNorm(dim=64))
    x = torch.randn(2, 7, 64) * 4 + 3
    expected = by_hand(x.bfloat16().float(), norm.weight, norm.bias, norm.eps)
    for params_dtype in (torch.float32, torch.bfloat16):
        out = norm.to(params_dtype)(x.bfloat16())
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), expected, atol=4e-2, rtol=2e-2)


def test_reset_parameters_after_meta_init():
    with torch.device("meta"):
        norm = LayerNorm(dim=8)
    norm = norm.to_empty(device="cpu")
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.ones(8)) and torch.equal(norm.bias, torch.zeros(8))
    x = torch.randn(4, 8)
    torch.testing.assert_close(norm(x), F.layer_norm(x, (8,), eps=1e-5))


def test_it_trains():
    torch.manual_seed(0)
    x = torch.randn(64, 16) * 2 + 1
    y = F.layer_norm(x, (16,)) * torch.linspace(0.5, 2.0, 16) + torch.linspace(-1, 1, 16)
    norm = LayerNorm(dim=16)
    opt = torch.optim.Adam(norm.parameters(), lr=5e-2)
    losses = []
    for _ in range(40):
        loss = F.mse_loss(norm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
