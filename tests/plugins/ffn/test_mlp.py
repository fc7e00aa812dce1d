import math

import pytest
import torch

from lightningllm.errors import ConfigError
from lightningllm_plugins.ffn.mlp import MLP

# Activations written out from their definitions, independent of the plugin's nn modules.
REFERENCE = {
    "relu": lambda h: torch.where(h > 0, h, torch.zeros_like(h)),
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
    "gelu_tanh": lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))),
    "silu": lambda h: h / (1 + torch.exp(-h)),
}


def reference(mlp: MLP, x: torch.Tensor, activation: str) -> torch.Tensor:
    up, down = mlp.up_proj, mlp.down_proj
    h = x @ up.weight.T + (up.bias if up.bias is not None else 0)
    return REFERENCE[activation](h) @ down.weight.T + (down.bias if down.bias is not None else 0)


@pytest.mark.parametrize("activation", sorted(REFERENCE))
@pytest.mark.parametrize("bias", [True, False])
def test_matches_formula(activation, bias):
    torch.manual_seed(0)
    mlp = MLP(dim=8, hidden_dim=32, dropout=0.0, activation=activation, bias=bias).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64) * 2
    torch.testing.assert_close(mlp(x), reference(mlp, x, activation))
    assert (mlp.up_proj.bias is not None) is bias and (mlp.down_proj.bias is not None) is bias


def test_default_is_exact_gelu_with_bias():
    mlp = MLP(dim=4, hidden_dim=8)
    assert mlp.activation == "gelu" and mlp.up_proj.bias is not None
    assert mlp.up_proj.weight.shape == (8, 4) and mlp.down_proj.weight.shape == (4, 8)


def test_gelu_variants_differ():
    # Guards against "gelu_tanh" silently mapping to the exact GELU (they differ by ~1e-4).
    torch.manual_seed(0)
    exact, tanh = MLP(dim=8, hidden_dim=32, activation="gelu"), MLP(dim=8, hidden_dim=32, activation="gelu_tanh")
    tanh.load_state_dict(exact.state_dict())
    x = torch.randn(4, 8) * 3
    assert not torch.allclose(exact(x), tanh(x), atol=1e-6, rtol=0)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    mlp = MLP(dim=8, hidden_dim=16, dropout=1.0)
    x = torch.randn(2, 3, 8)
    mlp.train()
    # Every hidden unit dropped: only the output bias is left.
    torch.testing.assert_close(mlp(x), mlp.down_proj.bias.expand(2, 3, 8))
    mlp.eval()
    torch.testing.assert_close(mlp(x), reference(mlp, x, "gelu"))


def test_unknown_activation_names_choices():
    with pytest.raises(ConfigError, match=r"'swish'.*relu, gelu, gelu_tanh, silu"):
        MLP(dim=4, hidden_dim=8, activation="swish")


def test_it_trains():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = torch.sin(x @ torch.randn(8, 8))
    mlp = MLP(dim=8, hidden_dim=32)
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(mlp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
