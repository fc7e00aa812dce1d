"""Shared pieces of the ffn plugin tests: references written out from their definitions, and a tiny fit."""

import math
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import nn

# Activations written out from their definitions, independent of the plugins' nn modules.
ACTIVATIONS = {
    "sigmoid": lambda h: 1 / (1 + torch.exp(-h)),
    "silu": lambda h: h / (1 + torch.exp(-h)),  # Swish with beta = 1
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),  # exact GELU
    "gelu_tanh": lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))),
    "relu": lambda h: torch.where(h > 0, h, torch.zeros_like(h)),
}


def affine(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T + b, read from a Linear's parameters without calling it."""
    return x @ linear.weight.T + (linear.bias if linear.bias is not None else 0)


def gated(ffn: nn.Module, x: torch.Tensor, activation: str) -> torch.Tensor:
    """FFN_GLU(x, W, V, W2) = (act(xW + b) * (xV + c)) W2 + b2 (Shazeer 2020, eq. 5-6)."""
    return affine(ffn.down_proj, ACTIVATIONS[activation](affine(ffn.gate_proj, x)) * affine(ffn.up_proj, x))


@pytest.fixture
def reference() -> SimpleNamespace:
    """``activations[name](h)``, ``affine(linear, x)`` and ``gated(ffn, x, activation)``."""
    return SimpleNamespace(activations=ACTIVATIONS, affine=affine, gated=gated)


def dropout_only_in_training(ffn: nn.Module, expected: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """With dropout=1.0 training drops every hidden unit, leaving the output bias; eval gives ``expected(x)``."""
    x = torch.randn(2, 3, 8)
    ffn.train()
    torch.testing.assert_close(ffn(x), ffn.down_proj.bias.expand(2, 3, 8))
    ffn.eval()
    torch.testing.assert_close(ffn(x), expected(x))


@pytest.fixture
def check_dropout_only_in_training():
    return dropout_only_in_training


def fit(make: Callable[[], nn.Module], steps: int = 60) -> list[float]:
    """A few Adam steps regressing ``make()`` (built after seeding) onto a fixed nonlinear target; the losses."""
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = torch.sin(x @ torch.randn(8, 8))
    ffn = make()
    opt = torch.optim.Adam(ffn.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(ffn(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def train():
    return fit


def gated_formula(make: Callable[..., nn.Module], activation: str, bias: bool) -> None:
    """``make(dim=, hidden_dim=, dropout=, bias=)`` computes Shazeer's gated formula with ``activation``."""
    torch.manual_seed(0)
    ffn = make(dim=8, hidden_dim=24, dropout=0.0, bias=bias).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64) * 2
    torch.testing.assert_close(ffn(x), gated(ffn, x, activation))
    assert all((p.bias is not None) is bias for p in (ffn.gate_proj, ffn.up_proj, ffn.down_proj))


@pytest.fixture
def check_gated_formula():
    return gated_formula
