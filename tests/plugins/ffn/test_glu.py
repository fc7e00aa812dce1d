import math

import pytest
import torch

from lightningllm.errors import ConfigError
from lightningllm_plugins.ffn.glu import GLU

# Gate activations written out from their definitions.
REFERENCE = {
    "sigmoid": lambda h: 1 / (1 + torch.exp(-h)),
    "silu": lambda h: h / (1 + torch.exp(-h)),
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
    "gelu_tanh": lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))),
    "relu": lambda h: torch.where(h > 0, h, torch.zeros_like(h)),
}


def shazeer(glu: GLU, x: torch.Tensor, activation: str) -> torch.Tensor:
    """FFN_GLU(x, W, V, W2) = (act(xW + b) * (xV + c)) W2 + b2 (Shazeer 2020, eq. 5-6)."""

    def affine(linear, inp):
        return inp @ linear.weight.T + (linear.bias if linear.bias is not None else 0)

    return affine(glu.down_proj, REFERENCE[activation](affine(glu.gate_proj, x)) * affine(glu.up_proj, x))


@pytest.mark.parametrize("activation", sorted(REFERENCE))
@pytest.mark.parametrize("bias", [False, True])
def test_matches_shazeer_formula(activation, bias):
    torch.manual_seed(0)
    glu = GLU(dim=8, hidden_dim=24, dropout=0.0, activation=activation, bias=bias).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64) * 2
    torch.testing.assert_close(glu(x), shazeer(glu, x, activation))
    assert all((p.bias is not None) is bias for p in (glu.gate_proj, glu.up_proj, glu.down_proj))


def test_defaults_are_the_original_glu():
    glu = GLU(dim=4, hidden_dim=6)
    assert glu.activation == "sigmoid" and glu.gate_proj.bias is None
    assert glu.gate_proj.weight.shape == glu.up_proj.weight.shape == (6, 4)
    assert glu.down_proj.weight.shape == (4, 6)


def test_gate_and_up_are_not_interchangeable():
    # The activation applies to gate_proj only: swapping the two projections changes the output.
    torch.manual_seed(0)
    glu = GLU(dim=8, hidden_dim=16)
    x = torch.randn(3, 8)
    swapped = GLU(dim=8, hidden_dim=16)
    state = glu.state_dict()
    state["gate_proj.weight"], state["up_proj.weight"] = state["up_proj.weight"], state["gate_proj.weight"]
    swapped.load_state_dict(state)
    assert not torch.allclose(glu(x), swapped(x))


def test_dropout_only_in_training():
    torch.manual_seed(0)
    glu = GLU(dim=8, hidden_dim=16, dropout=1.0, bias=True)
    x = torch.randn(2, 3, 8)
    glu.train()
    torch.testing.assert_close(glu(x), glu.down_proj.bias.expand(2, 3, 8))
    glu.eval()
    torch.testing.assert_close(glu(x), shazeer(glu, x, "sigmoid"))


def test_unknown_activation_names_choices():
    with pytest.raises(ConfigError, match=r"'tanh'.*sigmoid, silu, gelu, gelu_tanh, relu"):
        GLU(dim=4, hidden_dim=8, activation="tanh")


def test_it_trains():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = torch.sin(x @ torch.randn(8, 8))
    glu = GLU(dim=8, hidden_dim=32)
    opt = torch.optim.Adam(glu.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(glu(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
