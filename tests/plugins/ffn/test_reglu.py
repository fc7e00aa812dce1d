import inspect

import pytest
import torch

from lightningllm import registry
from lightningllm_plugins.ffn.glu import GLU
from lightningllm_plugins.ffn.reglu import ReGLU


def gate(h: torch.Tensor) -> torch.Tensor:
    """ReLU written out from its definition."""
    return torch.where(h > 0, h, torch.zeros_like(h))


@pytest.mark.parametrize("bias", [False, True])
def test_matches_shazeer_formula(bias):
    """FFN_ReGLU(x, W, V, W2) = (ReLU(xW) * xV) W2 (Shazeer 2020), plus biases when asked."""
    torch.manual_seed(0)
    ffn = ReGLU(dim=8, hidden_dim=24, dropout=0.0, bias=bias).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64) * 2

    def affine(linear, inp):
        return inp @ linear.weight.T + (linear.bias if linear.bias is not None else 0)

    expected = affine(ffn.down_proj, gate(affine(ffn.gate_proj, x)) * affine(ffn.up_proj, x))
    torch.testing.assert_close(ffn(x), expected)
    assert (ffn.gate_proj.bias is not None) is bias


def test_equals_glu_with_relu_gate():
    torch.manual_seed(0)
    ffn = ReGLU(dim=8, hidden_dim=16, dropout=0.0)
    glu = GLU(dim=8, hidden_dim=16, dropout=0.0, activation="relu")
    glu.load_state_dict(ffn.state_dict())
    x = torch.randn(2, 3, 8) * 2
    torch.testing.assert_close(ffn(x), glu(x))
    assert ffn.activation == "relu"


def test_activation_is_not_a_knob():
    assert "activation" not in inspect.signature(ReGLU).parameters
    with pytest.raises(TypeError):
        ReGLU(dim=8, hidden_dim=16, dropout=0.0, activation="sigmoid")


def test_registered_and_accepts_factory_keywords():
    assert registry.get("ffn", "ReGLU") is ReGLU
    ffn = registry.get("ffn", "ReGLU")(dim=4, hidden_dim=12, dropout=0.1, bias=True)
    assert ffn.up_proj.bias is not None and ffn.dropout.p == 0.1


def test_it_trains():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = torch.sin(x @ torch.randn(8, 8))
    ffn = ReGLU(dim=8, hidden_dim=32, dropout=0.0)
    opt = torch.optim.Adam(ffn.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(ffn(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
