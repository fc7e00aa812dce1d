import inspect

import pytest
import torch

from lightningllm import registry
from lightningllm_plugins.ffn.glu import GLU
from lightningllm_plugins.ffn.swiglu import SwiGLU


def gate(h: torch.Tensor) -> torch.Tensor:
    """SiLU (Swish with beta = 1) written out from its definition."""
    return h / (1 + torch.exp(-h))


@pytest.mark.parametrize("bias", [False, True])
def test_matches_shazeer_formula(bias):
    """FFN_SwiGLU(x, W, V, W2) = (SiLU (Swish with beta = 1)(xW) * xV) W2 (Shazeer 2020), plus biases when asked."""
    torch.manual_seed(0)
    ffn = SwiGLU(dim=8, hidden_dim=24, dropout=0.0, bias=bias).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64) * 2

    def affine(linear, inp):
        return inp @ linear.weight.T + (linear.bias if linear.bias is not None else 0)

    expected = affine(ffn.down_proj, gate(affine(ffn.gate_proj, x)) * affine(ffn.up_proj, x))
    torch.testing.assert_close(ffn(x), expected)
    assert (ffn.gate_proj.bias is not None) is bias


def test_equals_glu_with_silu_gate():
    torch.manual_seed(0)
    ffn = SwiGLU(dim=8, hidden_dim=16, dropout=0.0)
    glu = GLU(dim=8, hidden_dim=16, dropout=0.0, activation="silu")
    glu.load_state_dict(ffn.state_dict())
    x = torch.randn(2, 3, 8) * 2
    torch.testing.assert_close(ffn(x), glu(x))
    assert ffn.activation == "silu"


def test_activation_is_not_a_knob():
    assert "activation" not in inspect.signature(SwiGLU).parameters
    with pytest.raises(TypeError):
        SwiGLU(dim=8, hidden_dim=16, dropout=0.0, activation="sigmoid")


def test_registered_and_accepts_factory_keywords():
    assert registry.get("ffn", "SwiGLU") is SwiGLU
    ffn = registry.get("ffn", "SwiGLU")(dim=4, hidden_dim=12, dropout=0.1, bias=True)
    assert ffn.up_proj.bias is not None and ffn.dropout.p == 0.1


def test_it_trains():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = torch.sin(x @ torch.randn(8, 8))
    ffn = SwiGLU(dim=8, hidden_dim=32, dropout=0.0)
    opt = torch.optim.Adam(ffn.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(ffn(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
