"""MLP: checked against the two-layer formula with activations written out in conftest.py."""

import pytest
import torch

from lightningllm.errors import ConfigError
from lightningllm_plugins.ffn.mlp import MLP


def mlp_formula(reference, mlp: MLP, x: torch.Tensor, activation: str) -> torch.Tensor:
    """down(act(up(x))), from the parameters: act(x W1^T + b1) W2^T + b2."""
    return reference.affine(mlp.down_proj, reference.activations[activation](reference.affine(mlp.up_proj, x)))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_formula(activation, bias, reference):
    torch.manual_seed(0)
    mlp = MLP(dim=8, hidden_dim=32, dropout=0.0, activation=activation, bias=bias).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64) * 2
    torch.testing.assert_close(mlp(x), mlp_formula(reference, mlp, x, activation))
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


def test_dropout_only_in_training(check_dropout_only_in_training, reference):
    torch.manual_seed(0)
    mlp = MLP(dim=8, hidden_dim=16, dropout=1.0)
    check_dropout_only_in_training(mlp, lambda x: mlp_formula(reference, mlp, x, "gelu"))


def test_unknown_activation_names_choices():
    with pytest.raises(ConfigError, match=r"'swish'.*relu, gelu, gelu_tanh, silu"):
        MLP(dim=4, hidden_dim=8, activation="swish")


def test_it_trains(train):
    losses = train(lambda: MLP(dim=8, hidden_dim=32))
    assert losses[-1] < 0.5 * losses[0]
